//! Which instruction set the kernels run with, chosen once per process by what the CPU runs.
//!
//! cpuid alone is not trusted: some virtual machines of the kind rewind is deployed on report
//! extensions (AMX on Intel Xeons) whose first instruction faults. Each candidate kernel family
//! is therefore run once on known data in a forked child; a family whose child dies or computes
//! the wrong answer is not used.

use super::isa::Isa;
use std::sync::OnceLock;

impl Isa {
    /// The fastest family this CPU runs correctly.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let best = Self::usable().into_iter().next().unwrap_or(Isa::Portable);
            tracing::debug!("CPU kernels: {best:?}");
            best
        })
    }

    /// Every family this CPU runs correctly, fastest first (tests run each of them).
    pub fn usable() -> Vec<Isa> {
        [Isa::Avx512Vnni, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|isa| isa.reported() && runs_correctly(*isa))
            .collect()
    }
}

/// Runs a small product with `isa`'s kernels in a child process and compares it with the
/// portable result: a fault kills only the child.
#[cfg(unix)]
fn runs_correctly(isa: Isa) -> bool {
    if isa == Isa::Portable {
        return true;
    }
    let expected = super::products::self_test(Isa::Portable);
    // SAFETY: the child only computes on memory it already owns and leaves with _exit, so no
    // lock another thread held at the fork is ever taken and no destructor runs twice.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let got = super::products::self_test(isa);
            let same = got.len() == expected.len()
                && got
                    .iter()
                    .zip(&expected)
                    .all(|(g, e)| (g - e).abs() <= 1e-3 * (1.0 + e.abs()));
            libc::_exit(if same { 0 } else { 1 });
        }
        if pid < 0 {
            return false;
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0) == pid
            && libc::WIFEXITED(status)
            && libc::WEXITSTATUS(status) == 0
    }
}

#[cfg(not(unix))]
fn runs_correctly(_isa: Isa) -> bool {
    true
}
