//! A persistent team of threads for the decode path's kernels.
//!
//! A decode step is a few hundred short parallel sections (one per matrix product); handing
//! each to a general task pool costs more than the second core gives. The team's threads stay
//! alive, pinned one per core, and wait for the next section by spinning on a counter, then
//! park when none comes for a while (so an idle server burns no CPU). The calling thread works
//! as member 0 and spins until the others finish.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

/// Spins before a waiting member parks: about 50-200 µs, longer than the gap between two
/// sections of one step, far shorter than the gap between requests.
const SPINS_BEFORE_PARKING: u32 = 1 << 16;

type Task<'a> = &'a (dyn Fn(usize, usize) + Sync);

struct Shared {
    members: usize,
    /// Incremented to start a section.
    generation: AtomicUsize,
    /// Members (other than the caller) still working on the current section.
    running: AtomicUsize,
    /// The current section's task, valid while `running` > 0.
    task: UnsafeCell<Option<Task<'static>>>,
    panicked: AtomicBool,
    stopping: AtomicBool,
    parked: Mutex<usize>,
    wake: Condvar,
}

// SAFETY: `task` is written only by the caller while no member reads it (between sections),
// and read by members only during a section.
unsafe impl Sync for Shared {}

pub struct Team {
    shared: Arc<Shared>,
    /// One section at a time.
    caller: Mutex<()>,
    handles: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `members` threads, the caller included.
    pub fn new(members: usize) -> Team {
        let members = members.max(1);
        let shared = Arc::new(Shared {
            members,
            generation: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            task: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
        });
        let cores = allowed_cores();
        let handles = (1..members)
            .map(|member| {
                let shared = shared.clone();
                let core = cores.get(member % cores.len().max(1)).copied();
                std::thread::Builder::new()
                    .name(format!("rewind-kernel-{member}"))
                    .spawn(move || {
                        if let Some(core) = core {
                            pin_to(core);
                        }
                        serve(&shared, member)
                    })
                    .expect("spawning a kernel thread")
            })
            .collect();
        Team {
            shared,
            caller: Mutex::new(()),
            handles,
        }
    }

    /// The calling thread alone.
    pub fn single() -> Team {
        Team::new(1)
    }

    /// The process's team, one member per core the pool uses.
    pub fn global() -> &'static Team {
        static TEAM: OnceLock<Team> = OnceLock::new();
        TEAM.get_or_init(|| Team::new(crate::model::parallel::threads()))
    }

    pub fn members(&self) -> usize {
        self.shared.members
    }

    /// Runs `task(member, members)` on every member and returns when all are done. A panic in
    /// any member is re-raised here once every member has left the task.
    pub fn run(&self, task: &(dyn Fn(usize, usize) + Sync)) {
        let shared = &*self.shared;
        if shared.members == 1 {
            return task(0, 1);
        }
        let _one_section = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: no member reads `task` between sections; the borrow outlives the section
        // because this function waits for `running` to reach zero before returning.
        unsafe {
            *shared.task.get() = Some(std::mem::transmute::<Task<'_>, Task<'static>>(task));
        }
        shared.running.store(shared.members - 1, Ordering::Release);
        shared.generation.fetch_add(1, Ordering::AcqRel);
        if *shared.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            shared.wake.notify_all();
        }
        let own = catch_unwind(AssertUnwindSafe(|| task(0, shared.members)));
        while shared.running.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        // SAFETY: every member has finished the section.
        unsafe { *shared.task.get() = None };
        if let Err(panic) = own {
            resume_unwind(panic);
        }
        if shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a kernel thread panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        {
            let _parked = self.shared.parked.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

fn serve(shared: &Shared, member: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0;
        loop {
            let now = shared.generation.load(Ordering::Acquire);
            if now != seen {
                seen = now;
                break;
            }
            if spins < SPINS_BEFORE_PARKING {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut parked = shared.parked.lock().unwrap_or_else(|e| e.into_inner());
            *parked += 1;
            while shared.generation.load(Ordering::Acquire) == seen {
                parked = shared.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
            }
            *parked -= 1;
        }
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the caller set the task before bumping the generation and keeps it alive
        // until `running` reaches zero.
        if let Some(task) = unsafe { *shared.task.get() } {
            if catch_unwind(AssertUnwindSafe(|| task(member, shared.members))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The cores this process may run on.
fn allowed_cores() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    // SAFETY: sched_getaffinity fills the set it is given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            return (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect();
        }
    }
    Vec::new()
}

fn pin_to(core: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: sets this thread's own affinity to one core of the allowed set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = core;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_runs_each_section_once() {
        let team = Team::new(3);
        for _ in 0..1000 {
            let seen = [
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            ];
            team.run(&|member, members| {
                assert_eq!(members, 3);
                seen[member].fetch_add(1, Ordering::Relaxed);
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_panicking_member_fails_the_section_not_the_team() {
        let team = Team::new(2);
        let failed = catch_unwind(AssertUnwindSafe(|| {
            team.run(&|member, _| assert_ne!(member, 1, "member 1 fails"))
        }));
        assert!(failed.is_err());
        let count = AtomicUsize::new(0);
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn members_park_when_idle_and_wake_for_work() {
        let team = Team::new(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let count = AtomicUsize::new(0);
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }
}
