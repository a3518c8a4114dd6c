//! Test support shared by the workspace's crates.
//!
//! A test that cannot run on this machine (no FUSE, no test images, a kernel feature missing) calls [`skip`]
//! and returns: the skip is printed and recorded, never taken for a pass. Under CI (`CI=true`), where every
//! test must run, a skip fails the test instead.

use std::io::Write;

/// Records that the calling test cannot run here, for `reason`. Under `CI=true` it panics (fails the test);
/// otherwise it prints `SKIPPED: reason` and appends a line to the file named by `DELTABOX_SKIP_LOG` (which
/// `test.sh` reads to report the skips), and the caller returns.
pub fn skip(reason: impl std::fmt::Display) {
    let test = std::thread::current().name().unwrap_or("a test").to_string();
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} cannot run here ({reason}), and CI runs every test");
    }
    eprintln!("SKIPPED: {test}: {reason}");
    if let Some(log) = std::env::var_os("DELTABOX_SKIP_LOG") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| writeln!(f, "{test}: {reason}"));
        if let Err(e) = appended {
            panic!("cannot record the skip of {test} in {}: {e}", std::path::Path::new(&log).display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::skip;

    // One test: both halves change the process's environment.
    #[test]
    fn a_skip_is_recorded_and_fails_under_ci() {
        let log = std::env::temp_dir().join(format!("deltabox-skip-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&log);
        std::env::remove_var("CI");
        std::env::set_var("DELTABOX_SKIP_LOG", &log);
        skip("no frobnicator here");
        let recorded = std::fs::read_to_string(&log).unwrap();
        assert!(recorded.ends_with(": no frobnicator here\n"), "{recorded:?}");
        std::env::set_var("CI", "true");
        let under_ci = std::panic::catch_unwind(|| skip("still none"));
        std::env::remove_var("CI");
        assert!(under_ci.is_err(), "a skip under CI=true must fail the test");
        std::fs::remove_file(&log).unwrap();
    }
}
