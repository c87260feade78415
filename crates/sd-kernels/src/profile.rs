//! Opt-in wall-clock accounting of the host kernels, to see where a forward pass
//! spends its time (the `bench` example's `--profile`). Off by default: then each
//! kernel call pays one relaxed atomic load.
//!
//! Times are summed per kernel name over calls made from any thread; a kernel that
//! runs its work in parallel is counted once per call (wall time of the call), so the
//! figures add up to the time of the forward pass spent inside kernels.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<KernelTime>> = Mutex::new(Vec::new());

/// Time spent in one kernel since the last [`reset`].
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// Kernel name, e.g. `"conv3x3_winograd"`, `"attention_self"`.
    pub name: &'static str,
    /// Number of calls.
    pub calls: u64,
    /// Summed wall-clock time of the calls.
    pub total: Duration,
}

/// Turns the accounting on or off (it starts off).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears the totals.
pub fn reset() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The totals since the last [`reset`], largest first.
pub fn report() -> Vec<KernelTime> {
    let mut v = TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    v.sort_by_key(|k| std::cmp::Reverse(k.total));
    v
}

/// Adds the time until the guard drops to `name`'s total (when accounting is on).
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub(crate) fn scope(name: &'static str) -> Option<Scope> {
    ENABLED.load(Ordering::Relaxed).then(|| Scope {
        name,
        start: Instant::now(),
    })
}

/// See [`scope`].
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub(crate) struct Scope {
    name: &'static str,
    start: Instant,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let spent = self.start.elapsed();
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        match totals.iter_mut().find(|k| k.name == self.name) {
            Some(k) => {
                k.calls += 1;
                k.total += spent;
            }
            None => totals.push(KernelTime {
                name: self.name,
                calls: 1,
                total: spent,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_when_enabled() {
        // Other tests may run kernels meanwhile: look only at this test's names.
        let calls = |name: &str| report().iter().find(|k| k.name == name).map(|k| k.calls);
        enable(false);
        drop(scope("profile_test_off"));
        assert_eq!(calls("profile_test_off"), None);
        enable(true);
        drop(scope("profile_test_on"));
        drop(scope("profile_test_on"));
        enable(false);
        assert_eq!(calls("profile_test_on"), Some(2));
        reset();
        assert_eq!(calls("profile_test_on"), None);
    }
}
