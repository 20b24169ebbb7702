//! The upstream side, below everything that decides: one pool per (IDC, set, address) shared
//! by every snapshot that lists it ([`Upstreams`], [`Backend`], the [`Lease`] a request holds),
//! the bodies that stream over its connections ([`body`]), each address's observed health
//! ([`health`]: probe verdicts and passive ejection), the HTTP/1.1 client those connections
//! speak (`h1`), the gateway's headers a request carries beside its own ([`Stamp`]), and TLS
//! towards an IDC that asks for it ([`tls`]). It imports nothing of the gateway above it.

pub mod body;
pub mod client_body;
pub(crate) mod h1;
pub mod health;
mod pool;
mod stamp;
pub mod tls;

pub use h1::HeadLines;
pub use pool::{Backend, Lease, Upstreams};
pub use stamp::Stamp;
