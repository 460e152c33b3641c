//! Projects as code: the config's `[[projects]]` compared with the projects upstream, through the Projects API
//! (`/v1/organization/projects` on the upstream host). Only the `mantlegate projects` commands and `serve`'s
//! projects check ([`drift`]) call it; the proxy itself refuses those routes.
//!
//! [`client`] talks to the API (every page of the list, one project by id, retries, the credential); [`plan`]
//! matches configured projects to upstream ones and says what applying would change, as pure functions;
//! [`apply`] carries a plan out and says what the lock file records; [`import`] writes `[[projects]]` stanzas for
//! the upstream projects the config does not have; [`drift`] is `serve`'s periodic check of the projects upstream.

pub mod apply;
pub mod client;
pub mod drift;
pub mod import;
pub mod plan;

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// A project as the Projects API describes it (the fields the gateway reads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamProject {
    /// `proj_...`.
    pub id: String,
    /// Its name (not necessarily unique upstream).
    pub name: String,
    /// `active` or `archived`; absent is taken as active.
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
    /// Its cost allocation tags.
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: BTreeMap<String, String>,
}

impl UpstreamProject {
    /// Whether it is archived: it takes no new inference, and there is no way back.
    pub fn is_archived(&self) -> bool {
        self.status.eq_ignore_ascii_case("archived")
    }

    /// Whether it is the account's `default` project, which no config can hold (requests without a project land
    /// there): neither "not in the config" nor something to import.
    pub fn is_default(&self) -> bool {
        self.name.eq_ignore_ascii_case("default")
    }
}

/// `null` read as the type's default, as well as a missing field.
fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
