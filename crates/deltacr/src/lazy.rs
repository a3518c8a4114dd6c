//! Lazy restore: memory restored from an image comes back when it is touched, so a restore costs
//! O(mappings), not O(memory) (see docs/deltacr.md, "Lazy restore").
//!
//! A restored process's private anonymous mappings are registered with a userfaultfd made inside the
//! process ([`make_uffd`]) and served by the pager, one thread per [`Pager`]: a missing page that the image
//! holds is copied in from the image (CRC-checked, through the page cache) when touched, any other
//! missing page is a zero page, and what is still missing is filled in the background, at most half of
//! the pager's time. The pager follows what the process does to that memory (the uffd events):
//! MADV_DONTNEED/MADV_FREE and munmap drop ranges (they read zeros afterwards), mremap moves them, and a
//! fork gets its own uffd serving the child the same pages. While one of those events is pending the
//! kernel refuses fills (EAGAIN), so a fill never lands on memory whose layout changed under it.
//! [`Pager::fill_all`] completes every process before a checkpoint reads their memory.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use rustix::event::epoll;

use crate::image::ImageChain;
use crate::mm::{PageSource, PAGE};
use crate::ptrace::{Injector, PtraceError, Scratch};
use crate::state::Vma;
use crate::uffd::{self, FillError, Msg, Uffd};
use crate::{procfs, sys};

/// What a fault fills around the touched page (programs touch neighbouring pages together).
const FAULT_CHUNK: u64 = 64 << 10;
/// What one background step fills.
const FILL_CHUNK: u64 = 1 << 20;
/// What the pager asks of each uffd.
const FEATURES: u64 = uffd::FEATURE_EVENT_FORK
    | uffd::FEATURE_EVENT_REMAP
    | uffd::FEATURE_EVENT_REMOVE
    | uffd::FEATURE_EVENT_UNMAP
    | uffd::FEATURE_THREAD_ID;
/// epoll key of the pager's wake-up eventfd (spaces use their own keys, from 0).
const WAKE: u64 = u64::MAX;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("cannot {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("making a userfaultfd in process {pid}")]
    Inject {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error("giving the restored process /dev/userfaultfd")]
    Pass(#[from] crate::fdpass::PassError),
    #[error("the pager thread is gone")]
    Gone,
    #[error(
        "restored memory of {processes} process(es) could not be read from the image (corrupted); they were killed"
    )]
    Corrupt { processes: usize },
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> LazyError {
    move |source| LazyError::Io { what, source }
}

/// Disjoint page ranges `[start, end)`, by start, each with the address its data had in the image
/// (they differ once mremap moved it). Ranges are not merged, so one never spans two mappings (a fill
/// must stay inside one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(BTreeMap<u64, (u64, u64)>);

/// A range `[start, end)` whose data was at `source` in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub source: u64,
}

impl Range {
    /// Where the data of `addr` (inside the range) was in the image.
    pub fn source_of(&self, addr: u64) -> u64 {
        self.source + (addr - self.start)
    }
}

impl Ranges {
    /// Adds `[start, end)`, whose data is at the same address in the image. It must not overlap what is
    /// there.
    pub fn insert(&mut self, start: u64, end: u64) {
        self.insert_range(Range { start, end, source: start });
    }

    fn insert_range(&mut self, r: Range) {
        if r.start < r.end {
            self.0.insert(r.start, (r.end, r.source));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, (e, _))| e - s).sum()
    }

    fn get(&self, start: u64) -> Range {
        let (end, source) = self.0[&start];
        Range { start, end, source }
    }

    /// The range holding `addr`.
    pub fn containing(&self, addr: u64) -> Option<Range> {
        let (start, _) = self.0.range(..=addr).next_back().filter(|(_, (e, _))| addr < *e)?;
        Some(self.get(*start))
    }

    pub fn first(&self) -> Option<Range> {
        self.0.keys().next().map(|s| self.get(*s))
    }

    /// Takes `[start, end)` out; what it overlaps is cut.
    pub fn remove(&mut self, start: u64, end: u64) -> Ranges {
        let mut taken = Ranges::default();
        let hit: Vec<u64> = self.0.range(..end).rev().take_while(|(_, (e, _))| *e > start).map(|(s, _)| *s).collect();
        for s in hit {
            let r = self.get(s);
            self.0.remove(&s);
            let cut = |a: u64, b: u64| Range { start: a, end: b, source: r.source_of(a) };
            self.insert_range(cut(r.start, start.clamp(r.start, r.end)));
            self.insert_range(cut(end.clamp(r.start, r.end), r.end));
            taken.insert_range(cut(r.start.max(start), r.end.min(end)));
        }
        taken
    }

    /// Moves what lies in `[from, from + len)` to `to` (mremap).
    pub fn moved(&mut self, from: u64, len: u64, to: u64) {
        let taken = self.remove(from, from + len);
        // What was at the destination is gone (mremap unmapped it).
        self.remove(to, to + len);
        for (s, (e, source)) in taken.0 {
            self.insert_range(Range { start: s - from + to, end: e - from + to, source });
        }
    }
}

/// Where the pages of one restored process come from.
#[derive(Clone)]
pub struct Feed {
    pub chain: Arc<Mutex<ImageChain>>,
    /// The process's pid in the image.
    pub pid: i32,
}

impl PageSource for Feed {
    fn runs(&mut self, vma: &Vma) -> std::io::Result<Vec<(u64, u64)>> {
        self.chain.lock().expect("image chain lock").pages_of(self.pid).runs(vma)
    }

    fn read(&mut self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.chain.lock().expect("image chain lock").read(self.pid, addr, buf).map_err(std::io::Error::other)
    }
}

/// The memory of one process (one mm) that the pager serves.
struct Space {
    uffd: Uffd,
    feed: Feed,
    /// Pages still to come from the image.
    lazy: Ranges,
    /// Pages whose data the image could not give (corrupted): touching one kills the process.
    bad: Ranges,
    /// The sandbox's init (host pid): a faulting thread's process is found below it.
    init: Pid,
    /// The process, when known (a fork's child is not).
    process: Option<OwnedFd>,
    /// Its uffd is in the pager's epoll set. One that could not be added (no memory for it) has its
    /// messages read and its memory filled by the background steps, whatever `background_fill` says.
    watched: bool,
}

/// A process whose memory the pager is to serve.
pub struct Adopted {
    pub uffd: Uffd,
    pub feed: Feed,
    pub lazy: Ranges,
    pub init: Pid,
    pub process: OwnedFd,
}

enum Cmd {
    Adopt(Adopted),
    Forget(Pid),
    BackgroundFill(bool),
    FillAll(mpsc::Sender<Result<(), LazyError>>),
}

/// Handle to the pager thread. Dropping it lets the thread finish what is missing in the background
/// and end.
pub struct Pager {
    cmds: mpsc::Sender<Cmd>,
    wake: OwnedFd,
}

impl Pager {
    /// Starts the pager thread; with `background_fill`, it fills missing memory while idle (else only
    /// what is touched comes in, until [`Pager::fill_all`]).
    pub fn start(background_fill: bool) -> Result<Pager, LazyError> {
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)
                .map_err(|e| LazyError::Io { what: "make an eventfd", source: e.into() })?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| LazyError::Io { what: "make an epoll", source: e.into() })?;
        let thread_wake = wake.try_clone().map_err(io_err("dup an eventfd"))?;
        epoll::add(&epoll, &thread_wake, epoll::EventData::new_u64(WAKE), epoll::EventFlags::IN)
            .map_err(|e| LazyError::Io { what: "watch an eventfd", source: e.into() })?;
        let (cmds, rx) = mpsc::channel();
        let worker = Worker {
            epoll,
            wake: thread_wake,
            cmds: rx,
            spaces: HashMap::new(),
            next: 0,
            waiting: Vec::new(),
            background_fill,
        };
        std::thread::Builder::new()
            .name("deltacr-pager".into())
            .spawn(move || worker.run())
            .map_err(io_err("start the pager"))?;
        Ok(Pager { cmds, wake })
    }

    fn send(&self, cmd: Cmd) -> Result<(), LazyError> {
        self.cmds.send(cmd).map_err(|_| LazyError::Gone)?;
        rustix::io::write(&self.wake, &1u64.to_ne_bytes())
            .map_err(|e| LazyError::Io { what: "wake the pager", source: e.into() })?;
        Ok(())
    }

    /// Serves `process`'s registered memory from now on.
    pub fn adopt(&self, process: Adopted) -> Result<(), LazyError> {
        self.send(Cmd::Adopt(process))
    }

    /// Whether missing memory is filled while the pager is idle.
    pub fn set_background_fill(&self, on: bool) {
        // A gone pager has nothing to fill.
        let _ = self.send(Cmd::BackgroundFill(on));
    }

    /// Stops serving the processes of the sandbox whose init is `init`: they were all killed.
    pub fn forget(&self, init: Pid) -> Result<(), LazyError> {
        self.send(Cmd::Forget(init))
    }

    /// Returns once every process the pager serves has all its memory (no page left to come from an
    /// image). Processes forked meanwhile are completed too; call it with the sandbox frozen for a
    /// guarantee that holds until it thaws.
    pub fn fill_all(&self) -> Result<(), LazyError> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::FillAll(tx))?;
        rx.recv().map_err(|_| LazyError::Gone)?
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

struct Worker {
    epoll: OwnedFd,
    wake: OwnedFd,
    cmds: mpsc::Receiver<Cmd>,
    spaces: HashMap<u64, Space>,
    next: u64,
    /// Callers of [`Pager::fill_all`].
    waiting: Vec<mpsc::Sender<Result<(), LazyError>>>,
    background_fill: bool,
}

/// How serving a fault went.
enum Served {
    Done,
    /// An event must be read first.
    Later,
}

impl Worker {
    fn run(mut self) {
        let mut deferred: Vec<(u64, u64, u32)> = Vec::new();
        let mut orphaned = false;
        let mut pause = Duration::ZERO;
        let mut events = Vec::with_capacity(64);
        loop {
            let work =
                self.spaces.values().any(|s| !s.lazy.is_empty() && (self.background_fill || orphaned || !s.watched));
            if orphaned && self.spaces.is_empty() {
                return;
            }
            let timeout = if !self.waiting.is_empty() || !deferred.is_empty() {
                Some(rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })
            } else if work {
                Some(rustix::time::Timespec { tv_sec: 0, tv_nsec: pause.as_nanos().min(999_999_999) as i64 })
            } else {
                None
            };
            events.clear();
            match epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut events), timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::error!("pager: epoll_wait: {e}");
                    return;
                }
            }
            let ready: Vec<u64> = events
                .iter()
                .map(|e| {
                    let data = e.data;
                    data.u64()
                })
                .collect();
            for key in ready {
                if key == WAKE {
                    orphaned |= self.take_commands();
                } else {
                    self.read_messages(key, &mut deferred);
                }
            }
            deferred = std::mem::take(&mut deferred)
                .into_iter()
                .filter(|&(key, addr, tid)| matches!(self.fault(key, addr, tid), Served::Later))
                .collect();
            if events.is_empty() && (work || !self.waiting.is_empty()) {
                let started = Instant::now();
                self.fill_step(!self.waiting.is_empty(), &mut deferred);
                pause = started.elapsed();
            }
            self.close_complete(orphaned);
            if !self.waiting.is_empty() {
                self.answer_fill_all();
            }
        }
    }

    /// Handles the commands waiting; whether the [`Pager`] is gone.
    fn take_commands(&mut self) -> bool {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.wake, &mut buf);
        loop {
            match self.cmds.try_recv() {
                Ok(Cmd::Adopt(a)) => {
                    let space = Space {
                        uffd: a.uffd,
                        feed: a.feed,
                        lazy: a.lazy,
                        bad: Ranges::default(),
                        init: a.init,
                        process: Some(a.process),
                        watched: false,
                    };
                    self.add(space);
                }
                Ok(Cmd::FillAll(tx)) => self.waiting.push(tx),
                Ok(Cmd::Forget(init)) => self.forget(init),
                Ok(Cmd::BackgroundFill(on)) => self.background_fill = on,
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn add(&mut self, mut space: Space) {
        let key = self.next;
        self.next += 1;
        match epoll::add(&self.epoll, space.uffd.fd(), epoll::EventData::new_u64(key), epoll::EventFlags::IN) {
            Ok(()) => space.watched = true,
            Err(e) => tracing::warn!("pager: cannot watch a userfaultfd ({e}); filling its memory in the background"),
        }
        self.spaces.insert(key, space);
    }

    fn read_messages(&mut self, key: u64, deferred: &mut Vec<(u64, u64, u32)>) {
        loop {
            let Some(space) = self.spaces.get(&key) else { return };
            let msgs = match space.uffd.read() {
                Ok(m) if m.is_empty() => return,
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("pager: reading a userfaultfd: {e}");
                    return;
                }
            };
            for msg in msgs {
                self.handle(key, msg, deferred);
            }
        }
    }

    fn handle(&mut self, key: u64, msg: Msg, deferred: &mut Vec<(u64, u64, u32)>) {
        let Some(space) = self.spaces.get_mut(&key) else { return };
        match msg {
            Msg::Fault { addr, tid } => {
                if let Served::Later = self.fault(key, addr, tid) {
                    deferred.push((key, addr, tid));
                }
            }
            Msg::Fork { uffd } => {
                // SAFETY: the kernel installed this fd in our table for us with the fork event.
                let fd = unsafe { OwnedFd::from_raw_fd(uffd) };
                let child = Space {
                    uffd: Uffd::adopt(fd),
                    feed: space.feed.clone(),
                    lazy: space.lazy.clone(),
                    bad: space.bad.clone(),
                    init: space.init,
                    process: None,
                    watched: false,
                };
                self.add(child);
            }
            Msg::Remap { from, to, len } => {
                space.lazy.moved(from, len, to);
                space.bad.moved(from, len, to);
            }
            Msg::Remove { start, end } | Msg::Unmap { start, end } => {
                space.lazy.remove(start, end);
                space.bad.remove(start, end);
            }
            Msg::Other(event) => tracing::warn!("pager: unexpected userfaultfd event {event:#x}"),
        }
    }

    /// Serves a fault at `addr` of a thread whose id (in its pid namespace) is `tid`.
    fn fault(&mut self, key: u64, addr: u64, tid: u32) -> Served {
        let Some(space) = self.spaces.get_mut(&key) else { return Served::Done };
        let page = addr & !(PAGE - 1);
        if space.bad.containing(page).is_some() {
            kill_thread_process(space.init, tid);
            return Served::Done;
        }
        let Some(range) = space.lazy.containing(page) else {
            return match space.uffd.zero(page, PAGE) {
                Err(FillError::Again) => Served::Later,
                Err(FillError::Exists { .. }) => {
                    let _ = space.uffd.wake(page, PAGE);
                    Served::Done
                }
                _ => Served::Done,
            };
        };
        let window = page & !(FAULT_CHUNK - 1);
        let (s, e) = (range.start.max(window), range.end.min(window + FAULT_CHUNK));
        match fill(space, s, e, range.source_of(s)) {
            Filled::Again => Served::Later,
            Filled::Corrupt => {
                kill_thread_process(space.init, tid);
                Served::Done
            }
            Filled::Done | Filled::Dead => {
                // Woken by the fill; a page the fill skipped (already there) needs a wake.
                let _ = space.uffd.wake(page, PAGE);
                Served::Done
            }
        }
    }

    /// Fills one chunk (64 while a [`Pager::fill_all`] waits) of some process's missing memory, unwatched
    /// processes first (after reading their messages: faults that must wait go to `deferred`).
    fn fill_step(&mut self, all_out: bool, deferred: &mut Vec<(u64, u64, u32)>) {
        let Some((key, watched)) = self
            .spaces
            .iter()
            .filter(|(_, s)| !s.lazy.is_empty())
            .min_by_key(|(_, s)| s.watched)
            .map(|(k, s)| (*k, s.watched))
        else {
            return;
        };
        if !watched {
            self.read_messages(key, deferred);
        }
        let steps = if all_out { 64 } else { 1 };
        for _ in 0..steps {
            let Some(space) = self.spaces.get_mut(&key) else { return };
            let Some(r) = space.lazy.first() else { return };
            match fill(space, r.start, r.end.min(r.start + FILL_CHUNK), r.source) {
                Filled::Done => {}
                Filled::Again => return,
                Filled::Dead => {
                    self.spaces.remove(&key);
                    return;
                }
                Filled::Corrupt => {
                    if let Some(p) = &space.process {
                        let _ = rustix::process::pidfd_send_signal(p, rustix::process::Signal::KILL);
                    }
                }
            }
        }
    }

    /// Drops the spaces with nothing left to serve: closing a uffd unregisters its memory, whose faults
    /// the kernel then serves itself.
    /// (Spaces with corrupted pages stay to kill whoever touches one, until the sandbox's processes are
    /// killed or the pager is dropped.)
    fn close_complete(&mut self, orphaned: bool) {
        self.spaces.retain(|_, s| !s.lazy.is_empty() || (!orphaned && !s.bad.is_empty()));
    }

    /// Drops the spaces of sandbox `init` (its processes were all killed).
    fn forget(&mut self, init: Pid) {
        self.spaces.retain(|_, s| s.init != init);
    }

    fn answer_fill_all(&mut self) {
        // Events not read yet (a fork) may add memory to fill.
        let keys: Vec<u64> = self.spaces.keys().copied().collect();
        let mut deferred = Vec::new();
        for key in keys {
            self.read_messages(key, &mut deferred);
        }
        for (key, addr, tid) in deferred {
            // Served next round; nothing is complete while a fault waits.
            if let Served::Later = self.fault(key, addr, tid) {
                return;
            }
        }
        if self.spaces.values().any(|s| !s.lazy.is_empty()) {
            return;
        }
        // Processes with corrupted memory were killed; a space of a dead process ends with it.
        self.spaces.retain(|_, s| s.process.as_ref().is_none_or(|p| !matches!(sys::pidfd_exited(p.as_fd()), Ok(true))));
        let corrupt = self.spaces.len();
        for tx in self.waiting.drain(..) {
            let _ = tx.send(if corrupt == 0 { Ok(()) } else { Err(LazyError::Corrupt { processes: corrupt }) });
        }
    }
}

/// How filling a range went.
enum Filled {
    Done,
    /// An event must be read first.
    Again,
    /// The process's memory is gone.
    Dead,
    /// The image could not give the data (the range is now `bad`).
    Corrupt,
}

/// Fills `[start, end)` (inside one range of `space.lazy`, whose data was at `source` in the image) from
/// the image and takes it out of `lazy`.
fn fill(space: &mut Space, start: u64, end: u64, source: u64) -> Filled {
    let mut data = vec![0u8; (end - start) as usize];
    let read = space.feed.chain.lock().expect("image chain lock").read(space.feed.pid, source, &mut data);
    if let Err(e) = read {
        tracing::error!("pager: pages {start:#x}-{end:#x} of process {} cannot be read: {e}", space.feed.pid);
        space.lazy.remove(start, end);
        space.bad.insert(start, end);
        return Filled::Corrupt;
    }
    copy(space, start, &data)
}

/// Copies `data` to `start`, splitting where the range stopped being one registered mapping.
fn copy(space: &mut Space, start: u64, data: &[u8]) -> Filled {
    let end = start + data.len() as u64;
    match space.uffd.copy(start, data) {
        Ok(()) => {
            space.lazy.remove(start, end);
            Filled::Done
        }
        Err(FillError::Again) => Filled::Again,
        Err(FillError::Dead) => Filled::Dead,
        Err(FillError::Exists { done }) => {
            // Pages before `done` were filled; the next one is there already (the process's own).
            let next = start + done + PAGE;
            space.lazy.remove(start, next.min(end));
            if next < end {
                copy(space, next, &data[(next - start) as usize..])
            } else {
                Filled::Done
            }
        }
        Err(FillError::Gone) if data.len() as u64 > PAGE => {
            // A mapping boundary inside (mprotect split it, or part was unmapped): halves.
            let half = ((data.len() as u64 / PAGE) / 2) * PAGE;
            match copy(space, start, &data[..half as usize]) {
                Filled::Done => copy(space, start + half, &data[half as usize..]),
                other => other,
            }
        }
        Err(e) => {
            if !matches!(e, FillError::Gone) {
                tracing::warn!("pager: filling {start:#x}-{end:#x}: {e:?}");
            }
            space.lazy.remove(start, end);
            Filled::Done
        }
    }
}

/// Kills the process of the thread whose id in the sandbox is `tid`: its memory cannot be restored.
fn kill_thread_process(init: Pid, tid: u32) {
    let Ok(tree) = crate::capture::list_tree(init, &Default::default()) else { return };
    for pid in tree {
        let Ok(tasks) = procfs::tasks(pid) else { continue };
        for t in tasks {
            if procfs::Status::read_thread(pid, t).and_then(|s| s.innermost("NSpid")).ok() == Some(tid as i32) {
                tracing::error!("pager: killing process {} (host pid): its memory is corrupted in the image", pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                return;
            }
        }
    }
}

/// Makes a userfaultfd for the memory of the stopped process behind `inj` (whose mm is final: after
/// exec) and returns our copy of it. The process opens nothing itself: `dev` (our /dev/userfaultfd)
/// goes to it over a socket pair it makes, it asks the device for a uffd of its memory, and every fd
/// it got is closed before it runs again (it never runs its own code while holding them).
pub fn make_uffd(inj: &mut Injector, scratch: &Scratch, dev: BorrowedFd<'_>) -> Result<Uffd, LazyError> {
    let pid = inj.pid();
    let perr = |source| LazyError::Inject { pid: pid.as_raw(), source };
    let their_dev = crate::fdpass::give_fd(inj, scratch, dev, libc::MSG_CMSG_CLOEXEC)?;
    let result = (|| {
        let their_uffd = inj
            .call(
                libc::SYS_ioctl,
                &[their_dev as u64, uffd::USERFAULTFD_IOC_NEW, (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64],
            )
            .map_err(perr)? as i32;
        let pidfd = sys::pidfd_open(pid).map_err(io_err("open a pidfd"));
        let fd = pidfd.and_then(|p| sys::pidfd_getfd(p.as_fd(), their_uffd).map_err(io_err("take the userfaultfd")));
        let closed = inj.call(libc::SYS_close, &[their_uffd as u64]).map_err(perr);
        let fd = fd?;
        closed?;
        Uffd::new(fd, FEATURES).map_err(io_err("set up the userfaultfd"))
    })();
    let closed = inj.call(libc::SYS_close, &[their_dev as u64]).map_err(perr);
    if result.is_ok() {
        closed?;
    }
    result
}

/// Opens /dev/userfaultfd, or says why lazy restore is not possible here.
pub fn open_device() -> std::io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(v: &[(u64, u64)]) -> Ranges {
        let mut r = Ranges::default();
        for (s, e) in v {
            r.insert(*s, *e);
        }
        r
    }

    #[test]
    fn removing_cuts_what_overlaps_and_returns_it() {
        let mut r = ranges(&[(0, 10), (20, 30), (40, 50)]);
        let taken = r.remove(5, 45);
        assert_eq!(r, ranges(&[(0, 5), (45, 50)]));
        assert_eq!(taken, ranges(&[(5, 10), (20, 30), (40, 45)]));
        let mut r = ranges(&[(0, 100)]);
        r.remove(40, 60);
        assert_eq!(r, ranges(&[(0, 40), (60, 100)]));
        assert_eq!(r.containing(39).map(|r| (r.start, r.end)), Some((0, 40)));
        assert_eq!(r.containing(40), None);
        assert_eq!(r.containing(60).map(|r| (r.start, r.end, r.source)), Some((60, 100, 60)));
        assert_eq!(r.bytes(), 80);
        let mut r = ranges(&[(0, 10)]);
        assert!(r.remove(10, 20).is_empty());
        assert_eq!(r, ranges(&[(0, 10)]));
    }

    #[test]
    fn a_remap_moves_ranges_and_clears_the_destination() {
        let mut r = ranges(&[(0, 10), (20, 30), (100, 120)]);
        r.moved(0, 30, 105);
        let moved = |start, end, source| Range { start, end, source };
        assert_eq!(r.first(), Some(moved(100, 105, 100)));
        assert_eq!(r.containing(107), Some(moved(105, 115, 0)));
        assert_eq!(r.containing(107).unwrap().source_of(107), 2);
        assert_eq!(r.containing(130), Some(moved(125, 135, 20)));
        assert_eq!(r.bytes(), 25);
    }
}
