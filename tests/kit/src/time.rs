//! Time limits on test steps, so that a bug shows as a failure naming the
//! step, not as a test that hangs until CI kills it.

use std::future::Future;
use std::time::Duration;

/// Upper bound on any one wait of a test step.
pub const WAIT: Duration = Duration::from_secs(20);

/// Runs `future`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(future: impl Future<Output = T>) -> T {
    within_for(WAIT, future).await
}

/// Like [`within`] with a caller-chosen bound, for steps that legitimately
/// take longer (thousands of payments) or must be quicker.
pub async fn within_for<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("test step timed out after {limit:?}"))
}
