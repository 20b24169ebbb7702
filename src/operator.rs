//! The operator side: how people change and inspect the gateway.
//!
//! - [`cli`]: the `shardgate` commands (serve, validate, push, drain, move, failover,
//!   restore, degrade, status, explain).
//! - [`admin`]: the admin listener: probes, metrics, status, explain, the console, and the
//!   file-mode write endpoints.
//! - [`admin_client`]: the CLI's client of a gateway's admin API.
//! - [`cluster`]: the operator's etcd reads and guarded writes: plan and push a document,
//!   overrides, moves, and waiting for every gateway to apply them.

pub mod admin;
pub mod admin_client;
pub mod cli;
pub mod cluster;
