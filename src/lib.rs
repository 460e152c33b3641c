//! mantlegate: a reverse proxy that puts every OpenAI-compatible request to Amazon Bedrock (bedrock-mantle)
//! into the right project, with the gateway's own credential, and streams the answer back untouched.
//!
//! The request's path through the crate: [`server`] accepts it, [`app`] hands it to [`proxy::handle`],
//! which asks [`endpoint`] what it is, [`auth`] who sent it, [`attribution`] which project it belongs to,
//! and forwards it; [`error`] is every answer the gateway gives itself.

pub mod admin;
pub mod app;
pub mod attribution;
pub mod auth;
pub mod cli;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod endpoint;
pub mod error;
pub mod metering;
pub mod proxy;
pub mod send_timeout;
pub mod server;
pub mod shutdown;
pub mod telemetry;

pub use config::Config;
pub use error::GatewayError;
