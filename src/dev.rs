//! Development tools: simulated IDC backends with their ledger and the history checker
//! ([`sim`]), the demo ([`demo`]), and the fuzz targets' entry points ([`fuzz`]).

pub mod demo;
#[doc(hidden)]
pub mod fuzz;
pub mod sim;
