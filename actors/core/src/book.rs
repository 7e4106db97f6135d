//! One account's live balance as its account actor holds it: the committed
//! balance it has applied, and the amount reserved for settlements in flight.
//!
//! A reservation is taken before a settlement is written and turned into a
//! debit (or released) once its commit returns, so two concurrent payments can
//! never both spend the same money.

use tapledger_protocol::AccountId;

/// Live state of one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountBook {
    pub account: AccountId,
    /// The committed balance, including every commit this book has applied.
    /// It may lag redb by credits still on their way, never by debits: every
    /// debit was reserved here first.
    balance: u64,
    /// Sum of reservations whose settlement has not yet returned from commit.
    /// Invariant: `reserved <= balance`.
    reserved: u64,
    /// The commit sequence of the snapshot this book was loaded from; credits
    /// from commits at or below it are already included in `balance`.
    loaded_at_commit: u64,
}

impl AccountBook {
    pub fn new(account: AccountId, balance: u64, loaded_at_commit: u64) -> AccountBook {
        AccountBook {
            account,
            balance,
            reserved: 0,
            loaded_at_commit,
        }
    }

    pub fn balance(&self) -> u64 {
        self.balance
    }

    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// What a new payment may still spend.
    pub fn available(&self) -> u64 {
        self.balance - self.reserved
    }

    /// Reserves `amount` for a settlement, or returns what is available.
    /// Paying exactly the whole available balance is allowed.
    pub fn reserve(&mut self, amount: u64) -> Result<(), u64> {
        let available = self.available();
        if amount > available {
            return Err(available);
        }
        self.reserved += amount;
        self.check();
        Ok(())
    }

    /// The settlement holding a reservation of `amount` committed.
    pub fn debit(&mut self, amount: u64, commit: u64) {
        assert!(
            commit > self.loaded_at_commit,
            "account {}: debit from commit {commit} already in the loaded snapshot {}",
            self.account,
            self.loaded_at_commit
        );
        assert!(
            amount <= self.reserved,
            "account {}: debit {amount} above reserved {}",
            self.account,
            self.reserved
        );
        self.reserved -= amount;
        self.balance = self
            .balance
            .checked_sub(amount)
            .unwrap_or_else(|| panic!("account {}: debit {amount} below zero", self.account));
        self.check();
    }

    /// The settlement holding a reservation of `amount` did not commit.
    pub fn release(&mut self, amount: u64) {
        assert!(
            amount <= self.reserved,
            "account {}: release {amount} above reserved {}",
            self.account,
            self.reserved
        );
        self.reserved -= amount;
    }

    /// A committed credit. Credits from commits already in the loaded snapshot
    /// are skipped, so a credit is applied exactly once however the actor was
    /// (re)started.
    pub fn credit(&mut self, amount: u64, commit: u64) -> bool {
        if commit <= self.loaded_at_commit {
            return false;
        }
        self.balance = self
            .balance
            .checked_add(amount)
            .unwrap_or_else(|| panic!("account {}: credit {amount} overflows", self.account));
        true
    }

    fn check(&self) {
        assert!(
            self.reserved <= self.balance,
            "account {}: reserved {} above balance {}",
            self.account,
            self.reserved,
            self.balance
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_reservations_cannot_spend_the_same_money() {
        let mut book = AccountBook::new(1, 100, 0);
        assert_eq!(book.reserve(60), Ok(()));
        assert_eq!(book.reserve(60), Err(40));
        assert_eq!(book.reserve(40), Ok(()), "exactly the rest is fine");
        assert_eq!(book.available(), 0);
    }

    #[test]
    fn debit_and_release_settle_reservations() {
        let mut book = AccountBook::new(1, 100, 3);
        book.reserve(100).unwrap();
        book.debit(100, 4);
        assert_eq!((book.balance(), book.reserved()), (0, 0));
        book.credit(30, 5);
        book.reserve(30).unwrap();
        book.release(30);
        assert_eq!((book.balance(), book.available()), (30, 30));
    }

    #[test]
    fn credits_already_in_the_snapshot_are_not_applied_twice() {
        let mut book = AccountBook::new(1, 100, 7);
        assert!(!book.credit(50, 7));
        assert!(!book.credit(50, 2));
        assert!(book.credit(50, 8));
        assert_eq!(book.balance(), 150);
    }

    #[test]
    #[should_panic(expected = "debit 10 above reserved 0")]
    fn unreserved_debit_is_a_bug() {
        let mut book = AccountBook::new(1, 100, 0);
        book.debit(10, 1);
    }
}
