//! The network of a cluster of one: there is nobody to talk to. A replica
//! that somehow has peers in its membership on this network finds every one
//! of them unreachable.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{ReplicaId, ReplicaInfo, TypeConfig};

/// A [`RaftNetworkFactory`] with no peers.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoNetwork;

#[derive(Debug, thiserror::Error)]
#[error("replica {0} is unreachable: this replica has no network")]
struct NoRoute(ReplicaId);

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<ReplicaId, ReplicaInfo, RaftError<ReplicaId, E>>>;

impl RaftNetworkFactory<TypeConfig> for NoNetwork {
    type Network = NoRouteTo;

    async fn new_client(&mut self, target: ReplicaId, _node: &ReplicaInfo) -> NoRouteTo {
        NoRouteTo(target)
    }
}

/// The client [`NoNetwork`] gives for each peer: every call fails.
pub struct NoRouteTo(ReplicaId);

impl NoRouteTo {
    // openraft's own error types, as its traits return them.
    #[allow(clippy::result_large_err)]
    fn fail<T, E: std::error::Error>(&self) -> RpcResult<T, E> {
        Err(RPCError::Unreachable(Unreachable::new(&NoRoute(self.0))))
    }
}

impl RaftNetwork<TypeConfig> for NoRouteTo {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<ReplicaId>> {
        self.fail()
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<ReplicaId>, InstallSnapshotError> {
        self.fail()
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<ReplicaId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<ReplicaId>> {
        self.fail()
    }
}
