//! The control plane: what the gateway believes about the world, and who may change it.
//!
//! - [`topology`]: the immutable snapshot built from a document and its overrides: plain
//!   `*Spec` values, shard and serving tables, owner epochs, validation, diff. It imports no
//!   data-path module but route matching and the upstream pool.
//! - [`source`]: the file source and `Snapshots` (one `ArcSwap`, the acknowledged revision).
//! - [`etcd`]: the etcd source (one watch, cache, last-known-good), the gateway registry and
//!   the elected leader that decides IDC states and drives fenced moves.
//! - [`health`]: active probes and this gateway's IDC health view.
//! - [`failover`]: the pure failover/failback rules and the file-mode controller.
//! - [`moves`]: the phase function of a fenced move, the drivers' clocks, the file driver.
//! - [`self_fence`]: whether this gateway may write at all (lease and catch-up).
//! - [`tasks`]: supervision of every background task.

pub mod etcd;
pub mod failover;
pub mod health;
pub mod moves;
pub mod self_fence;
pub mod source;
pub mod tasks;
pub mod topology;
