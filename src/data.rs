//! The data path: everything a request touches, in the order it touches it.
//!
//! - [`server`]: accept, TLS ([`tls`]), the request-head gate ([`server::gate`]), hyper
//!   (HTTP/1.1, h2) with limits, watchdogs and graceful drain; the https redirect.
//! - [`proxy`]: the pipeline: request id, header hygiene ([`headers`]), one snapshot load,
//!   the routing decision, admission, the exchange, and the misroute re-forward.
//! - [`route`]: route matching and sharding-key extraction (pure), path normalisation.
//! - [`admission`]: set budgets, priority shedding, rate limits, degrade switches, breakers.
//! - [`forward`]: picking a backend (power of two choices), connect, retries and spill inside
//!   a pool, passive outlier signals; it asks for retries through [`forward::RetryBudget`].
//! - [`upstream`]: the low-level pool: backends, leases, the bodies streaming over pooled
//!   connections, backend health, TLS towards an IDC. It imports nothing above it.
//! - [`upgrade`]: WebSocket upgrades: 101, then bytes both ways until the shard moves.
//! - [`error`]: the one request-path error and its status mapping.

pub mod admission;
pub mod error;
pub mod forward;
pub mod headers;
pub mod proxy;
pub mod route;
pub mod server;
pub mod tls;
pub mod upgrade;
pub mod upstream;
