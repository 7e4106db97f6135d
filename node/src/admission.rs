//! Who gets a place on the node: the rate of new connection attempts above
//! which clients must prove their address (QUIC Retry), the table of open
//! connections (and whether it is nearly full, when connections that have
//! not authenticated get a shorter deadline), and the authenticated
//! connections each account holds.
//!
//! Only bookkeeping: the accept loop (`server.rs`) and the sessions
//! (`session.rs`) decide what to do with the answers. Nothing here reads a
//! socket.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tapledger_protocol::AccountId;
use tokio::sync::watch;

use crate::server::NodeCounters;

/// A token bucket of connection attempts: `rate` tokens a second, holding
/// at most one second's worth. Each attempt that is not yet validated takes
/// one; an attempt that finds the bucket empty is over the rate.
#[derive(Debug)]
pub struct AttemptBudget {
    /// Tokens added per second; 0 means every attempt is over the rate.
    rate: f64,
    /// Tokens now, 0 ..= `rate`.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl AttemptBudget {
    /// A full bucket of `per_sec` attempts.
    pub fn new(per_sec: u32, now: Instant) -> AttemptBudget {
        AttemptBudget {
            rate: f64::from(per_sec),
            tokens: f64::from(per_sec),
            updated: now,
        }
    }

    /// Takes one attempt's token; false when the bucket is empty (over the rate).
    pub fn take(&mut self, now: Instant) -> bool {
        // A clock that went backwards (it cannot with `Instant`) adds nothing.
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The connections the node holds (handshakes in progress included), and
/// whether that is at or above `busy_above_percent` of `connections_max`.
#[derive(Debug)]
pub struct ConnectionTable {
    /// Its `connections_open`, handshaking or established, is kept here.
    counters: Arc<NodeCounters>,
    /// `open` at or above this is busy.
    busy_at: usize,
    /// True while busy; sessions wait on it.
    busy: watch::Sender<bool>,
}

impl ConnectionTable {
    /// Keeps `counters.connections_open`, which the metrics read.
    pub fn new(
        counters: Arc<NodeCounters>,
        connections_max: usize,
        busy_above_percent: u8,
    ) -> ConnectionTable {
        // Rounded up, and at least 1: with a cap of 10 at 90 %, busy from 9 open.
        let busy_at = (connections_max * usize::from(busy_above_percent))
            .div_ceil(100)
            .max(1);
        ConnectionTable {
            counters,
            busy_at,
            busy: watch::Sender::new(false),
        }
    }

    pub fn open(&self) -> usize {
        self.counters.connections_open.load(Ordering::Acquire)
    }

    /// Counts a new connection.
    pub fn opened(&self) {
        self.counters
            .connections_open
            .fetch_add(1, Ordering::AcqRel);
        self.update();
    }

    /// Counts a connection gone.
    pub fn closed(&self) {
        self.counters
            .connections_open
            .fetch_sub(1, Ordering::AcqRel);
        self.update();
    }

    /// Changes to true while the table is busy, back to false when not.
    pub fn watch_busy(&self) -> watch::Receiver<bool> {
        self.busy.subscribe()
    }

    fn update(&self) {
        // Read the count under the channel's lock: of two updates racing,
        // the later one sees the later count, so the flag never sticks.
        self.busy.send_if_modified(|busy| {
            let now_busy = self.open() >= self.busy_at;
            let changed = *busy != now_busy;
            *busy = now_busy;
            changed
        });
    }
}

/// Authenticated connections per account, capped.
#[derive(Debug)]
pub struct AccountConnections {
    /// Held at once per account at most.
    max: u32,
    /// Accounts with at least one authenticated connection; each count is
    /// 1 ..= `max`, and the entry goes when its last connection does.
    held: Mutex<HashMap<AccountId, u32>>,
}

impl AccountConnections {
    pub fn new(max: u32) -> Arc<AccountConnections> {
        Arc::new(AccountConnections {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more authenticated connection of `account`, or
    /// `None` when it holds `max` already. The place is given back when
    /// the slot is dropped.
    pub fn hold(self: &Arc<Self>, account: AccountId) -> Option<AccountSlot> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = held.entry(account).or_insert(0);
        if *count >= self.max {
            if *count == 0 {
                held.remove(&account);
            }
            return None;
        }
        *count += 1;
        Some(AccountSlot {
            registry: self.clone(),
            account,
        })
    }

    /// Authenticated connections `account` holds now.
    pub fn held(&self, account: AccountId) -> u32 {
        let held = self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        held.get(&account).copied().unwrap_or(0)
    }
}

/// One authenticated connection's place in its account's count.
#[derive(Debug)]
pub struct AccountSlot {
    registry: Arc<AccountConnections>,
    account: AccountId,
}

impl Drop for AccountSlot {
    fn drop(&mut self) {
        let mut held = self
            .registry
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = held.get_mut(&self.account) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.account);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_budget_allows_its_rate_and_refills_over_time() {
        let start = Instant::now();
        let mut budget = AttemptBudget::new(10, start);
        let taken = (0..25).filter(|_| budget.take(start)).count();
        assert_eq!(taken, 10, "a full bucket holds one second's worth");
        // 50 ms refill half a token: not enough.
        assert!(!budget.take(start + Duration::from_millis(50)));
        // 150 ms more: 1.5 tokens more, 2 in all.
        let later = start + Duration::from_millis(200);
        assert!(budget.take(later));
        assert!(budget.take(later));
        assert!(!budget.take(later));
        // A long pause refills to the cap, not beyond.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..25).filter(|_| budget.take(later)).count(), 10);
        let mut never = AttemptBudget::new(0, start);
        assert!(!never.take(start + Duration::from_secs(5)));
    }

    #[test]
    fn the_table_is_busy_at_its_share_of_the_cap_and_not_below() {
        let counters = Arc::new(NodeCounters::default());
        let table = ConnectionTable::new(counters.clone(), 10, 90);
        let busy = table.watch_busy();
        for _ in 0..8 {
            table.opened();
        }
        assert!(!*busy.borrow());
        table.opened();
        assert!(*busy.borrow(), "9 of 10 is 90 %");
        assert_eq!(counters.connections_open.load(Ordering::Relaxed), 9);
        table.closed();
        assert!(!*busy.borrow());
        assert_eq!(table.open(), 8);
    }

    #[test]
    fn an_account_holds_at_most_its_cap_and_gets_places_back() {
        let accounts = AccountConnections::new(2);
        let first = accounts.hold(7).expect("first");
        let second = accounts.hold(7).expect("second");
        assert!(accounts.hold(7).is_none());
        assert!(
            accounts.hold(8).is_some(),
            "other accounts are not affected"
        );
        assert_eq!(accounts.held(7), 2);
        drop(first);
        let third = accounts.hold(7).expect("a place came back");
        drop((second, third));
        assert_eq!(accounts.held(7), 0);
        assert!(
            accounts.held.lock().unwrap().is_empty(),
            "no entry left behind"
        );
    }
}
