//! The plan is a pure function of its seed and starting balances: these tests
//! check reproducibility and that every expectation holds whatever order the
//! node settles payments in.

use super::*;

fn config(seed: u64, payments: u64, fault_share: f64) -> WorkloadConfig {
    WorkloadConfig {
        seed,
        payments,
        fault_share,
        faults: Kind::FAULTS.to_vec(),
        amount_max: 5_000,
        max_amount: 100_000_000,
        rate: Some(1_000.0),
        jitter_us_max: 2_000,
        epoch_payments: None,
    }
}

/// The plan without its tx_keys, which are fresh on purpose.
fn shape(plan: &Plan) -> Vec<String> {
    plan.payments
        .iter()
        .map(|p| {
            format!(
                "{:?} {} {} {} {} {} {} {} {} {:?} {} {}",
                p.kind,
                p.sender,
                p.receiver,
                p.amount,
                p.expected_amount,
                p.expected_sender,
                p.at_us,
                p.send_delay_us,
                p.receive_delay_us,
                p.lone_side,
                p.by_query,
                p.epoch
            )
        })
        .collect()
}

#[test]
fn same_seed_same_plan_other_seed_other_plan() {
    let balances = vec![200_000; 20];
    let first = plan(&config(7, 500, 0.2), &balances).unwrap();
    let again = plan(&config(7, 500, 0.2), &balances).unwrap();
    let other = plan(&config(8, 500, 0.2), &balances).unwrap();
    assert_eq!(shape(&first), shape(&again));
    assert_ne!(shape(&first), shape(&other));
    assert_ne!(
        first.payments[0].tx_key, again.payments[0].tx_key,
        "tx_keys are fresh on every run"
    );
}

/// Per epoch, what each phone is sure to hold: its starting balance plus
/// credits of epochs up to `k - 2` minus every debit planned up to `k`. The
/// runner guarantees no more is in flight, so this must never go negative.
fn assert_no_order_overdraws(plan: &Plan, balances: &[u64]) {
    let epochs = plan.payments.last().map_or(0, |p| p.epoch) + 1;
    for epoch in 0..epochs {
        let mut sure: Vec<i128> = balances.iter().map(|&b| i128::from(b)).collect();
        for payment in plan.payments.iter().filter(|p| p.kind.settles()) {
            if payment.epoch <= epoch {
                sure[payment.sender as usize] -= i128::from(payment.amount);
            }
            if payment.epoch + 2 <= epoch {
                sure[payment.receiver as usize] += i128::from(payment.amount);
            }
        }
        for (phone, sure) in sure.iter().enumerate() {
            assert!(
                *sure >= 0,
                "phone {phone} could overdraw in epoch {epoch}: {sure}"
            );
        }
    }
}

#[test]
fn honest_payments_never_spend_more_than_is_certainly_there() {
    // Small balances and many payments: without epochs the phones run out.
    let balances = vec![3_000; 10];
    let without_epochs = plan(&config(3, 2_000, 0.1), &balances).unwrap_err();
    assert!(matches!(without_epochs, PlanError::OutOfMoney(_)));
    let with_epochs = WorkloadConfig {
        epoch_payments: Some(20),
        amount_max: 300,
        ..config(3, 2_000, 0.1)
    };
    let plan = plan(&with_epochs, &balances).unwrap();
    assert_eq!(plan.payments.len(), 2_000);
    assert!(plan.payments.iter().all(|p| p.amount >= 1));
    assert_eq!(plan.payments.last().unwrap().epoch, 99);
    assert_no_order_overdraws(&plan, &balances);
    // Whatever order they settle in, money is conserved.
    let after = balances_after(&balances, plan.payments.iter());
    assert_eq!(after.iter().sum::<u64>(), balances.iter().sum::<u64>());
}

#[test]
fn without_epochs_phones_spend_only_their_starting_balance() {
    let balances = vec![40_000; 10];
    let plan = plan(
        &WorkloadConfig {
            amount_max: 1_000,
            ..config(3, 200, 0.1)
        },
        &balances,
    )
    .unwrap();
    let mut spent = vec![0u64; balances.len()];
    for payment in plan.payments.iter().filter(|p| p.kind.settles()) {
        spent[payment.sender as usize] += payment.amount;
        assert_eq!(payment.epoch, 0);
    }
    for (phone, spent) in spent.iter().enumerate() {
        assert!(*spent <= balances[phone], "phone {phone} spends {spent}");
    }
}

#[test]
fn overdraws_exceed_anything_the_sender_could_hold() {
    let balances = vec![10_000; 8];
    let with_epochs = WorkloadConfig {
        epoch_payments: Some(40),
        amount_max: 500,
        ..config(11, 3_000, 0.3)
    };
    let plan = plan(&with_epochs, &balances).unwrap();
    assert_no_order_overdraws(&plan, &balances);
    let overdraws: Vec<_> = plan
        .payments
        .iter()
        .filter(|p| p.kind == Kind::Overdraw)
        .collect();
    assert!(!overdraws.is_empty());
    for overdraw in overdraws {
        // Every credit that could have landed before it is decided: anything
        // planned up to the next epoch.
        let sender = overdraw.sender;
        let could_hold: u64 = balances[sender as usize]
            + plan
                .payments
                .iter()
                .filter(|p| {
                    p.kind.settles() && p.receiver == sender && p.epoch <= overdraw.epoch + 1
                })
                .map(|p| p.amount)
                .sum::<u64>();
        assert!(overdraw.amount > could_hold, "{overdraw:?} vs {could_hold}");
        assert_eq!(overdraw.amount, overdraw.expected_amount);
    }
}

#[test]
fn faults_are_drawn_at_about_the_configured_share_and_all_kinds_appear() {
    let balances = vec![1_000_000; 50];
    let plan = plan(&config(5, 10_000, 0.05), &balances).unwrap();
    let faults = plan
        .payments
        .iter()
        .filter(|p| p.kind != Kind::Normal)
        .count();
    assert!((400..=600).contains(&faults), "{faults} faults in 10,000");
    for kind in Kind::FAULTS {
        assert!(
            plan.payments.iter().any(|p| p.kind == kind),
            "{kind:?} never drawn"
        );
    }
}

#[test]
fn fault_payments_name_the_parties_their_outcome_needs() {
    let balances = vec![100_000; 5];
    let config = WorkloadConfig {
        epoch_payments: Some(10),
        ..config(9, 2_000, 1.0)
    };
    let plan = plan(&config, &balances).unwrap();
    for payment in &plan.payments {
        assert_ne!(payment.sender, payment.receiver);
        match payment.kind {
            Kind::SenderMismatch => {
                assert_ne!(payment.expected_sender, payment.sender);
                assert_ne!(payment.expected_sender, payment.receiver);
            }
            Kind::AmountMismatch => {
                assert_ne!(payment.expected_amount, payment.amount);
                assert!(payment.expected_amount >= 1);
            }
            _ => {
                assert_eq!(payment.expected_sender, payment.sender);
                assert_eq!(payment.expected_amount, payment.amount);
            }
        }
        assert!(!payment.expectations().is_empty());
        let phones = payment.phones();
        assert!(phones.windows(2).all(|pair| pair[0] < pair[1]));
    }
}

#[test]
fn arrivals_follow_the_rate_and_closed_loop_has_no_schedule() {
    let balances = vec![1_000_000; 10];
    let open = plan(
        &WorkloadConfig {
            epoch_payments: Some(20),
            ..config(1, 10_000, 0.0)
        },
        &balances,
    )
    .unwrap();
    let last = open.payments.last().unwrap().at_us;
    // 10,000 arrivals at 1,000 per second take about 10 s.
    assert!((9_000_000..11_000_000).contains(&last), "{last}");
    assert!(open.payments.windows(2).all(|w| w[0].at_us <= w[1].at_us));
    let closed = plan(
        &WorkloadConfig {
            rate: None,
            ..config(1, 100, 0.0)
        },
        &balances,
    )
    .unwrap();
    assert!(closed.payments.iter().all(|p| p.at_us == 0));
}

#[test]
fn refuses_impossible_plans_with_a_reason() {
    assert_eq!(
        plan(&config(1, 10, 0.1), &[100, 100]).unwrap_err(),
        PlanError::TooFewPhones(2)
    );
    let broke = plan(&config(1, 100, 0.0), &[1, 1, 1]).unwrap_err();
    assert!(matches!(broke, PlanError::OutOfMoney(_)), "{broke}");
    let huge = plan(
        &WorkloadConfig {
            max_amount: 5_000,
            faults: vec![Kind::Overdraw],
            ..config(1, 5, 1.0)
        },
        &[5_000; 4],
    )
    .unwrap_err();
    assert!(matches!(huge, PlanError::OverdrawTooLarge { .. }), "{huge}");
}

#[test]
fn scenario_names_round_trip() {
    for kind in Kind::ALL {
        assert_eq!(Kind::from_name(kind.name()), Some(kind));
    }
    assert_eq!(Kind::from_name("nonsense"), None);
}
