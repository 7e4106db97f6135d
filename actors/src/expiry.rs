//! The expiry actor: on a steady tick it asks every matcher shard to expire
//! the lone halves whose partner did not arrive within `half_ttl`. Deadlines
//! are node time (a half's receive time plus the TTL), never a phone's clock;
//! the decisions themselves are made by the pure matcher core.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::matcher::MatcherMsg;

pub enum ExpiryMsg {
    Tick,
}

pub struct ExpiryActor;

pub struct ExpiryArgs {
    pub matchers: Vec<ActorRef<MatcherMsg>>,
    pub tick: Duration,
}

impl Actor for ExpiryActor {
    type Msg = ExpiryMsg;
    type State = Vec<ActorRef<MatcherMsg>>;
    type Arguments = ExpiryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ExpiryMsg>,
        args: ExpiryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // The interval task ends when this actor stops.
        myself.send_interval(args.tick, || ExpiryMsg::Tick);
        Ok(args.matchers)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ExpiryMsg>,
        message: ExpiryMsg,
        matchers: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ExpiryMsg::Tick => {
                for matcher in matchers.iter() {
                    let _ = matcher.send_message(MatcherMsg::ExpireDue { done: None });
                }
            }
        }
        Ok(())
    }
}

/// How often to sweep for a given TTL: often enough that a half expires within
/// about a tenth of its TTL after its deadline, at most once a millisecond and
/// at least once a second.
pub fn tick_for(half_ttl: Duration) -> Duration {
    (half_ttl / 10).clamp(Duration::from_millis(1), Duration::from_secs(1))
}
