//! The local terminal during `deltabox exec -t` and `deltabox shell`.

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{AttachControl, TtySize};

/// The size of our terminal (80x24 when stdout is not one).
pub fn size() -> TtySize {
    match rustix::termios::tcgetwinsize(std::io::stdout()) {
        Ok(ws) if ws.ws_row > 0 && ws.ws_col > 0 => TtySize { rows: ws.ws_row, cols: ws.ws_col },
        _ => TtySize { rows: 24, cols: 80 },
    }
}

/// Puts stdin's terminal in raw mode (keys go to the sandbox as typed) until dropped.
pub struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    pub fn enable() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &self.saved);
    }
}

/// Sends a resize control frame whenever our terminal changes size (SIGWINCH).
pub fn forward_resizes(tx: mpsc::Sender<Message>) {
    tokio::spawn(async move {
        let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
            return;
        };
        while winch.recv().await.is_some() {
            let TtySize { rows, cols } = size();
            let frame = serde_json::to_string(&AttachControl::Resize { rows, cols }).expect("json");
            if tx.send(Message::Text(frame.into())).await.is_err() {
                return;
            }
        }
    });
}
