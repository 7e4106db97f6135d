//! Where the process spent its CPU, per thread, from Linux's
//! `/proc/self/task/*/schedstat` (nanoseconds on a CPU, nanoseconds runnable
//! but waiting for one) and `/proc/self/io` (bytes sent to storage). Two
//! snapshots around a phase give its breakdown by thread name: the ledger's
//! commit thread, the tokio workers, and the rest.
//!
//! `/proc/stat` adds the whole machine's busy time, so that CPU used by other
//! processes during a run (a compiler next door) shows in the report rather
//! than silently lowering the figures.
//!
//! On other systems, or with schedstats missing, snapshots are empty and the
//! report leaves the section out. Threads that ended between two snapshots
//! are not counted.

use std::collections::{BTreeMap, HashMap};

/// CPU figures of one thread at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ThreadSample {
    name: String,
    run_ns: u64,
    wait_ns: u64,
}

/// All threads of the process at one moment, by thread id, and the bytes the
/// process had caused to be written to storage so far.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    threads: HashMap<u32, ThreadSample>,
    write_bytes: Option<u64>,
    machine_busy_ns: Option<u64>,
}

/// What the threads of one name did between two snapshots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadGroupTimes {
    pub threads: usize,
    /// Time on a CPU.
    pub run_ns: u64,
    /// Time runnable but waiting for a CPU.
    pub wait_ns: u64,
}

/// The difference between two snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// By thread name (`comm`, at most 15 characters).
    pub by_name: BTreeMap<String, ThreadGroupTimes>,
    pub write_bytes: Option<u64>,
    /// CPU time all processes of the machine spent busy (user, system,
    /// interrupts, steal), this one included.
    pub machine_busy_ns: Option<u64>,
}

impl Usage {
    /// CPU time of this process's threads.
    pub fn run_ns(&self) -> u64 {
        self.by_name.values().map(|group| group.run_ns).sum()
    }

    /// CPU time the rest of the machine used meanwhile (approximate: the two
    /// sources count in different units and at different moments).
    pub fn others_busy_ns(&self) -> Option<u64> {
        self.machine_busy_ns
            .map(|busy| busy.saturating_sub(self.run_ns()))
    }
}

impl Snapshot {
    pub fn take() -> Snapshot {
        let mut threads = HashMap::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|tid| tid.parse().ok()) else {
                    continue;
                };
                let path = task.path();
                let (Ok(name), Ok(schedstat)) = (
                    std::fs::read_to_string(path.join("comm")),
                    std::fs::read_to_string(path.join("schedstat")),
                ) else {
                    continue;
                };
                if let Some((run_ns, wait_ns)) = parse_schedstat(&schedstat) {
                    threads.insert(
                        tid,
                        ThreadSample {
                            name: name.trim_end().to_string(),
                            run_ns,
                            wait_ns,
                        },
                    );
                }
            }
        }
        let write_bytes = std::fs::read_to_string("/proc/self/io")
            .ok()
            .and_then(|io| parse_io_field(&io, "write_bytes:"));
        let machine_busy_ns = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| parse_stat_busy_ns(&stat));
        Snapshot {
            threads,
            write_bytes,
            machine_busy_ns,
        }
    }

    /// What happened from `self` to `later`. A thread born in between counts
    /// from zero.
    pub fn usage_until(&self, later: &Snapshot) -> Usage {
        let mut by_name: BTreeMap<String, ThreadGroupTimes> = BTreeMap::new();
        for (tid, sample) in &later.threads {
            let (run_before, wait_before) = self
                .threads
                .get(tid)
                .filter(|before| before.name == sample.name)
                .map_or((0, 0), |before| (before.run_ns, before.wait_ns));
            let group = by_name.entry(sample.name.clone()).or_default();
            group.threads += 1;
            group.run_ns += sample.run_ns.saturating_sub(run_before);
            group.wait_ns += sample.wait_ns.saturating_sub(wait_before);
        }
        let write_bytes = match (self.write_bytes, later.write_bytes) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before)),
            _ => None,
        };
        let machine_busy_ns = match (self.machine_busy_ns, later.machine_busy_ns) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before)),
            _ => None,
        };
        Usage {
            by_name,
            write_bytes,
            machine_busy_ns,
        }
    }
}

/// `schedstat` is `run_ns wait_ns timeslices`.
fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace();
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// `/proc/stat` counts in USER_HZ ticks, which Linux fixes at 100 per second
/// for every architecture's user-visible interfaces.
const USER_HZ_NS: u64 = 10_000_000;

/// Busy time of all CPUs from the first `cpu` line of `/proc/stat`: user,
/// nice, system, irq, softirq and steal (not idle or iowait).
fn parse_stat_busy_ns(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let busy_ticks = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&index| ticks.get(index).copied().unwrap_or(0))
        .sum::<u64>();
    Some(busy_ticks * USER_HZ_NS)
}

fn parse_io_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(field))?;
    line[field.len()..].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schedstat_and_io() {
        assert_eq!(
            parse_schedstat("476204646 82352 30\n"),
            Some((476_204_646, 82_352))
        );
        assert_eq!(parse_schedstat(""), None);
        let io = "rchar: 6976\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_io_field(io, "write_bytes:"), Some(8_192));
        let stat = "cpu  10 1 20 500 7 3 2 4 0 0\ncpu0 5 0 10 250 3 1 1 2 0 0\n";
        assert_eq!(parse_stat_busy_ns(stat), Some(40 * USER_HZ_NS));
    }

    #[test]
    fn usage_counts_this_threads_work() {
        let before = Snapshot::take();
        // Spin for a while, then sleep so the scheduler books the time.
        let started = std::time::Instant::now();
        let mut sum = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(30) {
            sum = std::hint::black_box(sum.wrapping_add(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let usage = before.usage_until(&Snapshot::take());
        if cfg!(target_os = "linux") {
            assert!(usage.run_ns() > 0, "{usage:?}");
            assert!(usage.machine_busy_ns.is_some(), "{usage:?}");
        }
    }
}
