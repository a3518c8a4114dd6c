//! Busy polling of the FUSE device during bursts of requests.
//!
//! A FUSE round trip wakes two sleeping threads: the server's reader when a request arrives and
//! the caller when the answer does. On this machine (a VM whose idle vCPUs halt) each wake-up of a
//! thread on an idle CPU costs several microseconds, most of a ~15 µs round trip. While requests
//! come in a burst (tar, `rm -rf`, a build's stat storm) the server's main reader therefore reads
//! the device without blocking (`O_NONBLOCK`; fuser retries a read that finds nothing at once), so
//! a request is picked up without waking anyone. A controller thread switches the device back to
//! blocking reads once no request has come for the idle window: a burst costs at most one window of
//! spinning CPU after its last request, and sparse requests (more than a window apart) never spin.
//! Measured numbers: `docs/deltafs.md`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Switches a FUSE device between spinning and blocking reads around bursts of requests.
pub(crate) struct BusyPoll {
    /// A duplicate of the session's main `/dev/fuse` fd: file status flags belong to the open
    /// file, so `O_NONBLOCK` set through it applies to the reader of the original. Set once the
    /// session exists (it is created with the filesystem that notes the requests).
    device: OnceLock<OwnedFd>,
    /// Requests closer together than this start a burst; a burst ends after this long without one.
    window: Duration,
    epoch: Instant,
    /// Nanoseconds from `epoch` to the latest request.
    last_request: AtomicU64,
    polling: AtomicBool,
    control: Mutex<Control>,
    wake: Condvar,
}

#[derive(Default)]
struct Control {
    stop: bool,
}

impl BusyPoll {
    pub(crate) fn new(window: Duration) -> Arc<BusyPoll> {
        Arc::new(BusyPoll {
            device: OnceLock::new(),
            window,
            epoch: Instant::now(),
            last_request: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            control: Mutex::new(Control::default()),
            wake: Condvar::new(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Called for every request: starts polling when it follows the previous one within the window.
    pub(crate) fn note_request(&self) {
        let now = self.now();
        let previous = self.last_request.swap(now, Ordering::Relaxed);
        if !self.polling.load(Ordering::Relaxed) && now.saturating_sub(previous) < self.window.as_nanos() as u64 {
            self.set_polling(true);
        }
    }

    fn set_polling(&self, on: bool) {
        let _control = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(device) = self.device.get() else { return };
        if self.polling.load(Ordering::Relaxed) == on {
            return;
        }
        match set_nonblocking(device.as_fd(), on) {
            Ok(()) => {
                self.polling.store(on, Ordering::Relaxed);
                self.wake.notify_one();
            }
            // Blocking reads are always correct; only the latency is lost.
            Err(e) => tracing::warn!(error = %e, on, "cannot switch FUSE busy polling"),
        }
    }

    /// Starts the controller for the session's main device fd `device`.
    pub(crate) fn start(self: &Arc<Self>, device: BorrowedFd<'_>) -> std::io::Result<Controller> {
        let device = device.try_clone_to_owned()?;
        self.device.set(device).map_err(|_| std::io::Error::other("busy polling started twice"))?;
        let poll = self.clone();
        let thread = std::thread::Builder::new().name("deltafs-poll".into()).spawn(move || poll.control_loop())?;
        Ok(Controller { poll: self.clone(), thread: Some(thread) })
    }

    /// Ends each burst after a window without requests.
    fn control_loop(&self) {
        let mut control = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while !control.stop {
            if !self.polling.load(Ordering::Relaxed) {
                control = self.wake.wait(control).unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            let idle = Duration::from_nanos(self.now().saturating_sub(self.last_request.load(Ordering::Relaxed)));
            if idle >= self.window {
                drop(control);
                self.set_polling(false);
                control = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            } else {
                control = self
                    .wake
                    .wait_timeout(control, self.window - idle)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        }
    }
}

/// The running controller thread; dropping it stops the thread and leaves the device blocking.
pub(crate) struct Controller {
    poll: Arc<BusyPoll>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.poll.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner).stop = true;
        self.poll.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.poll.set_polling(false);
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> nix::Result<()> {
    let mut flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop)
}
