//! A hook call's CPU budget, for both hosts: counted in the CPU time of the
//! thread that runs the call, so neighbours on a loaded machine (or a host
//! function blocked on the store) do not eat a policy's budget, with a
//! wall-clock backstop so a call can never hold its caller for long either.

use std::time::{Duration, Instant};

/// The wall-clock backstop is this many times the CPU budget.
pub const WALL_FACTOR: u32 = 10;

/// CPU time the calling thread has used since it started.
pub fn thread_cpu() -> Duration {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a
        // constant every supported Unix has.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc == 0 {
            return Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        }
    }
    // No per-thread CPU clock: wall time since an arbitrary start, which makes
    // the budget the wall-clock one it was before.
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// How long after its start a lazily started call first looks at its clock.
pub const FIRST_LOOK: Duration = Duration::from_millis(1);

/// One call's budget, on the thread that runs the call.
///
/// Reading the thread's CPU clock is a system call (~0.4 µs), a fifth of a
/// warm Wasm hook call, so a call may start *lazily*: the CPU clock is first
/// read when the host first looks (at [`FIRST_LOOK`]) or when the guest first
/// calls a host function, whichever comes first, and everything before that
/// (at most about a millisecond of the guest running) is counted as CPU.
#[derive(Debug, Clone, Copy)]
pub struct CallClock {
    /// The CPU clock when first read, and the wall time before that (all
    /// counted as CPU).
    cpu_start: Option<(Duration, Duration)>,
    wall_start: Instant,
    budget: Duration,
}

impl CallClock {
    /// Starts now, reading the CPU clock now.
    pub fn start(budget: Duration) -> Self {
        let mut clock = CallClock::lazy(budget);
        clock.begin();
        clock
    }

    /// Starts now; the CPU clock is read at the first [`Self::begin`] or
    /// [`Self::remaining`].
    pub fn lazy(budget: Duration) -> Self {
        CallClock {
            cpu_start: None,
            wall_start: Instant::now(),
            budget,
        }
    }

    /// When to look first: at [`FIRST_LOOK`], or at the budget if sooner.
    pub fn first_look(&self) -> Duration {
        self.budget.min(FIRST_LOOK)
    }

    /// Reads the CPU clock if it was not read yet, counting the time since
    /// the start as CPU time.
    pub fn begin(&mut self) {
        if self.cpu_start.is_none() {
            self.cpu_start = Some((thread_cpu(), self.wall_start.elapsed()));
        }
    }

    /// What is left: of the CPU budget, and of the wall-clock backstop;
    /// `None` once either is used up. Call it on the thread that started it.
    pub fn remaining(&mut self) -> Option<Duration> {
        self.begin();
        let (at, before) = self.cpu_start.unwrap_or_default();
        let used = thread_cpu().saturating_sub(at) + before;
        let cpu = self.budget.checked_sub(used)?;
        let wall = self
            .budget
            .saturating_mul(WALL_FACTOR)
            .checked_sub(self.wall_start.elapsed())?;
        let left = cpu.min(wall);
        (!left.is_zero()).then_some(left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_sleeps_uses_no_cpu_budget_but_meets_the_backstop() {
        let mut clock = CallClock::start(Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(40));
        // 40 ms of wall time, almost no CPU: still within the budget.
        assert!(clock.remaining().is_some());
        std::thread::sleep(Duration::from_millis(170));
        // Past 10 x 20 ms of wall time: the backstop.
        assert_eq!(clock.remaining(), None);
    }

    #[test]
    fn a_thread_that_spins_uses_its_budget() {
        let mut clock = CallClock::lazy(Duration::from_millis(20));
        let mut x = 0u64;
        let t = Instant::now();
        while clock.remaining().is_some() && t.elapsed() < Duration::from_secs(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert_eq!(clock.remaining(), None);
        assert!(thread_cpu() >= Duration::from_millis(20));
    }

    #[test]
    fn a_lazy_clock_counts_the_time_before_its_first_look() {
        let mut clock = CallClock::lazy(Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        // Read late: the 30 ms before count, as a wall-clock budget would.
        assert_eq!(clock.remaining(), None);
        let mut clock = CallClock::lazy(Duration::from_millis(20));
        clock.begin();
        std::thread::sleep(Duration::from_millis(30));
        assert!(clock.remaining().is_some());
    }
}
