//! The settlement rules as pure functions: which halves are acceptable on
//! their own, and what two halves of one `tx_key` decide together.
//!
//! Precedence is written down once, here, and in `RejectCode`'s docs. Balance
//! checks are not here: only the sender's account actor knows what it can pay.

use tapledger_protocol::{AccountId, Half, ISSUER_ACCOUNT_ID, ReceiveHalf, RejectCode, SendHalf};

/// What a single half is checked against before the key's state is looked at.
#[derive(Clone, Copy, Debug)]
pub struct HalfContext {
    /// The account the submitting connection authenticated as.
    pub submitter: AccountId,
    /// Accounts `1 .. accounts_end` exist (ids are assigned in order, never removed).
    pub accounts_end: AccountId,
    /// The largest amount a half may name.
    pub max_amount: u64,
}

impl HalfContext {
    fn account_exists(&self, account: AccountId) -> bool {
        account != ISSUER_ACCOUNT_ID && account < self.accounts_end
    }
}

/// Checks a half on its own. Order: 620 wrong party, 400 invalid amount,
/// 600 unknown account, 410 a receive half that expects itself as sender.
///
/// An unknown `expected_sender_id` is not refused here: it is what the
/// receiver's phone said, and pairing reports it as a sender mismatch.
pub fn check_half(half: &Half, context: &HalfContext) -> Result<(), RejectCode> {
    if half.party() != context.submitter {
        return Err(RejectCode::WrongParty);
    }
    let amount = half.amount();
    if amount == 0 || amount > context.max_amount {
        return Err(RejectCode::InvalidAmount);
    }
    if !context.account_exists(half.party()) {
        return Err(RejectCode::UnknownAccount);
    }
    if let Half::Receive(receive) = half
        && receive.expected_sender_id == receive.receiver_id
    {
        return Err(RejectCode::SelfPayment);
    }
    Ok(())
}

/// Decides what two halves of one key say together, before any balance is
/// looked at. Order: 200 sender mismatch, 300 amount mismatch, 410 paying
/// yourself. `Ok` means the sender's account must now reserve the amount.
pub fn check_pair(send: &SendHalf, receive: &ReceiveHalf) -> Result<(), RejectCode> {
    debug_assert_eq!(send.tx_key, receive.tx_key);
    if receive.expected_sender_id != send.sender_id {
        return Err(RejectCode::SenderMismatch);
    }
    if receive.expected_amount != send.amount {
        return Err(RejectCode::AmountMismatch);
    }
    if send.sender_id == receive.receiver_id {
        return Err(RejectCode::SelfPayment);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tapledger_protocol::TxKey;

    use super::*;

    fn send(sender_id: AccountId, amount: u64) -> SendHalf {
        SendHalf {
            tx_key: TxKey::from_u128(1),
            sender_id,
            amount,
            device_os: "android".into(),
            client_time: 0,
        }
    }

    fn receive(
        receiver_id: AccountId,
        expected_sender_id: AccountId,
        expected_amount: u64,
    ) -> ReceiveHalf {
        ReceiveHalf {
            tx_key: TxKey::from_u128(1),
            receiver_id,
            expected_sender_id,
            expected_amount,
            device_os: "ios".into(),
            client_time: 0,
        }
    }

    const CONTEXT: HalfContext = HalfContext {
        submitter: 1,
        accounts_end: 10,
        max_amount: 1_000,
    };

    #[test]
    fn agreeing_halves_pass() {
        assert_eq!(check_pair(&send(1, 50), &receive(2, 1, 50)), Ok(()));
    }

    #[test]
    fn sender_mismatch_wins_over_amount_mismatch() {
        assert_eq!(
            check_pair(&send(1, 50), &receive(2, 3, 60)),
            Err(RejectCode::SenderMismatch)
        );
        assert_eq!(
            check_pair(&send(1, 50), &receive(2, 1, 60)),
            Err(RejectCode::AmountMismatch)
        );
    }

    #[test]
    fn paying_yourself_is_rejected_even_when_halves_agree() {
        assert_eq!(
            check_pair(&send(2, 50), &receive(2, 2, 50)),
            Err(RejectCode::SelfPayment)
        );
        // Disagreement is reported before self-payment.
        assert_eq!(
            check_pair(&send(2, 50), &receive(2, 2, 51)),
            Err(RejectCode::AmountMismatch)
        );
    }

    #[test]
    fn single_half_checks_in_documented_order() {
        let own = Half::Send(send(1, 50));
        assert_eq!(check_half(&own, &CONTEXT), Ok(()));
        let someone_else = Half::Send(send(2, 0));
        assert_eq!(
            check_half(&someone_else, &CONTEXT),
            Err(RejectCode::WrongParty)
        );
        assert_eq!(
            check_half(&Half::Send(send(1, 0)), &CONTEXT),
            Err(RejectCode::InvalidAmount)
        );
        assert_eq!(
            check_half(&Half::Send(send(1, 1_001)), &CONTEXT),
            Err(RejectCode::InvalidAmount)
        );
        assert_eq!(check_half(&Half::Send(send(1, 1_000)), &CONTEXT), Ok(()));
        let unknown = HalfContext {
            submitter: 10,
            ..CONTEXT
        };
        assert_eq!(
            check_half(&Half::Send(send(10, 5)), &unknown),
            Err(RejectCode::UnknownAccount)
        );
        let issuer = HalfContext {
            submitter: ISSUER_ACCOUNT_ID,
            ..CONTEXT
        };
        assert_eq!(
            check_half(&Half::Send(send(ISSUER_ACCOUNT_ID, 5)), &issuer),
            Err(RejectCode::UnknownAccount),
            "the issuer cannot make payments"
        );
        let receiver = HalfContext {
            submitter: 2,
            ..CONTEXT
        };
        assert_eq!(
            check_half(&Half::Receive(receive(2, 2, 5)), &receiver),
            Err(RejectCode::SelfPayment)
        );
        assert_eq!(
            check_half(&Half::Receive(receive(2, 99, 5)), &receiver),
            Ok(()),
            "unknown sender is a mismatch later"
        );
    }
}
