//! Operator overrides: IDC states and degrade switches that sit on top of the document.
//! The effective snapshot is always `document + overrides`, rebuilt whole on any change.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The state of an IDC (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdcState {
    #[default]
    Active,
    /// Planned: shards leave behind a write fence.
    Draining,
    /// Emergency: shards leave at once.
    Down,
    /// Coming back: home shards return in steps.
    Warming,
}

impl IdcState {
    pub const ALL: [IdcState; 4] = [
        IdcState::Active,
        IdcState::Draining,
        IdcState::Down,
        IdcState::Warming,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IdcState::Active => "active",
            IdcState::Draining => "draining",
            IdcState::Down => "down",
            IdcState::Warming => "warming",
        }
    }
}

impl fmt::Display for IdcState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `override/idc/<idc>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdcOverride {
    pub state: IdcState,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub by: String,
    /// Unix seconds when it was written.
    #[serde(default)]
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// `override/degrade/<set or route:name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DegradeOverride {
    pub on: bool,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overrides {
    #[serde(default)]
    pub idcs: BTreeMap<String, IdcOverride>,
    #[serde(default)]
    pub degrade: BTreeMap<String, DegradeOverride>,
}

impl Overrides {
    /// The IDC's state at `now` (unix seconds): an expired override no longer applies.
    pub fn idc_state(&self, idc: &str, now: u64) -> Option<&IdcOverride> {
        self.idcs
            .get(idc)
            .filter(|o| o.expires_at.is_none_or(|exp| exp > now))
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
