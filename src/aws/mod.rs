//! The gateway's AWS credentials for bedrock-mantle: the standard credential chain kept fresh
//! ([`credentials`]), and the two ways of presenting them: every request signed with SigV4 ([`sigv4`]), or
//! short-term Bedrock API keys minted from them ([`token`]). And, for reconciliation, the token counts AWS
//! publishes in CloudWatch ([`cloudwatch`]).

pub mod cloudwatch;
pub mod credentials;
pub mod sigv4;
pub mod token;

pub use credentials::AwsCredentials;
