//! mantlegate: a reverse proxy that puts every OpenAI-compatible request to Amazon Bedrock (bedrock-mantle)
//! into the right project, with the gateway's own credential, and streams the answer back untouched.
//!
//! The request's path through the crate: [`server`] accepts it, [`app`] hands it to [`proxy::handle`], which
//! takes the [`snapshot`] of the config in force ([`live`]), asks [`endpoint`] what it is, [`auth`] who sent
//! it, [`attribution`] which project it belongs to, and forwards it; as it ends, its [`record`] goes to the
//! sinks ([`metering`], the access log). [`error`] is every answer the gateway gives itself.

pub mod admin;
pub mod app;
pub mod attribution;
pub mod auth;
pub mod aws;
pub mod cli;
pub mod config;
pub mod demo;
pub mod endpoint;
pub mod error;
pub mod limits;
pub mod live;
pub mod metering;
pub mod projects;
pub mod proxy;
pub mod reconcile;
pub mod record;
pub mod send_timeout;
pub mod server;
pub mod shutdown;
pub mod snapshot;
pub mod telemetry;
pub mod watch;

pub use config::Config;
pub use error::GatewayError;
