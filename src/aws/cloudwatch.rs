//! The token counts AWS itself publishes for bedrock-mantle: `TotalInputTokens` and `TotalOutputTokens` in the
//! CloudWatch namespace `AWS/BedrockMantle`, read with `GetMetricData` (the only permission this needs:
//! `cloudwatch:GetMetricData`), summed in periods of an hour over a window. The client is the AWS SDK's, with the
//! default credential chain and the same ring-based HTTP client as the gateway's credentials (no aws-lc);
//! `AWS_ENDPOINT_URL_CLOUDWATCH` (or `AWS_ENDPOINT_URL`) points it elsewhere, as for every AWS SDK.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_cloudwatch::error::{ProvideErrorMetadata as _, SdkError};
use aws_sdk_cloudwatch::operation::get_metric_data::GetMetricDataError;
use aws_sdk_cloudwatch::types::{Dimension, Metric, MetricDataQuery, MetricStat, StatusCode};
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::reconcile::window::{PERIOD, Window};

/// The namespace bedrock-mantle publishes in.
pub const NAMESPACE: &str = "AWS/BedrockMantle";

/// `GetMetricData` takes at most 500 queries a request; two per series.
const SERIES_PER_REQUEST: usize = 250;

/// The longest one `GetMetricData` call (its retries included) may take.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

/// One series of the namespace: the account's (no dimension), a project's (`Project`), or a project's for one
/// model (`Project` and `Model`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Series {
    /// The `Project` dimension's value; none for the account's series.
    pub project: Option<String>,
    /// The `Model` dimension's value.
    pub model: Option<String>,
}

/// What CloudWatch holds of one series over a window: none where it has no data point.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sums {
    /// `TotalInputTokens`, summed.
    pub input: Option<u64>,
    /// `TotalOutputTokens`, summed.
    pub output: Option<u64>,
}

impl Sums {
    /// Whether CloudWatch had any data point for the series.
    pub fn has_data(&self) -> bool {
        self.input.is_some() || self.output.is_some()
    }
}

/// CloudWatch could not be read: no credentials, refused, unreachable. The message names what and where, never
/// a secret.
#[derive(Debug, thiserror::Error)]
#[error("could not read CloudWatch ({NAMESPACE} in {region}): {why}")]
pub struct ReadError {
    /// The region asked.
    pub region: String,
    /// What went wrong.
    pub why: String,
}

/// A CloudWatch client for one region.
#[derive(Debug, Clone)]
pub struct CloudWatch {
    client: aws_sdk_cloudwatch::Client,
    region: String,
}

impl CloudWatch {
    /// A client for `region`, else for the region the AWS SDK's own settings give (`AWS_REGION`, the profile,
    /// instance metadata). Credentials are fetched from the default chain on the first call.
    pub async fn new(region: Option<&str>) -> anyhow::Result<Self> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(TimeoutConfig::builder().operation_timeout(OPERATION_TIMEOUT).build());
        if let Some(region) = region {
            loader = loader.region(Region::new(region.to_owned()));
        }
        let sdk = loader.load().await;
        let region = sdk.region().map(ToString::to_string).ok_or_else(|| {
            anyhow::anyhow!(
                "no AWS region to read CloudWatch in: give --region, set upstream.region in the config, or AWS_REGION"
            )
        })?;
        Ok(Self { client: aws_sdk_cloudwatch::Client::new(&sdk), region })
    }

    /// The region it reads.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Each series' sums over `window`, in hour periods; a series with no data point has none.
    pub async fn sums(&self, window: &Window, series: &[Series]) -> Result<HashMap<Series, Sums>, ReadError> {
        let mut found: HashMap<Series, Sums> = series.iter().map(|s| (s.clone(), Sums::default())).collect();
        for batch in series.chunks(SERIES_PER_REQUEST) {
            let queries: Vec<MetricDataQuery> = batch
                .iter()
                .enumerate()
                .flat_map(|(i, s)| {
                    [("TotalInputTokens", format!("i{i}")), ("TotalOutputTokens", format!("o{i}"))]
                        .map(|(metric, id)| query(id, metric, s))
                })
                .collect();
            let sums = self.read(window, queries).await?;
            for (i, s) in batch.iter().enumerate() {
                let entry = found.entry(s.clone()).or_default();
                entry.input = sums.get(&format!("i{i}")).copied();
                entry.output = sums.get(&format!("o{i}")).copied();
            }
        }
        Ok(found)
    }

    /// One batch of queries, page after page: each query id's values summed (one query's values may come on
    /// several pages). Ids with no data point are absent.
    async fn read(&self, window: &Window, queries: Vec<MetricDataQuery>) -> Result<HashMap<String, u64>, ReadError> {
        let mut sums: HashMap<String, f64> = HashMap::new();
        let mut token: Option<String> = None;
        let mut tokens_seen = HashSet::new();
        loop {
            let page = self
                .client
                .get_metric_data()
                .set_metric_data_queries(Some(queries.clone()))
                .start_time(window.start.into())
                .end_time(window.end.into())
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| self.error(&e))?;
            for result in page.metric_data_results() {
                match result.status_code() {
                    Some(StatusCode::Forbidden) => {
                        return Err(self.refused("Forbidden", "CloudWatch refused a query of the namespace"));
                    }
                    Some(StatusCode::InternalError) => {
                        return Err(self.refused("InternalError", "CloudWatch failed to answer a query"));
                    }
                    _ => {}
                }
                let Some(id) = result.id() else { continue };
                if !result.values().is_empty() {
                    *sums.entry(id.to_owned()).or_default() += result.values().iter().sum::<f64>();
                }
            }
            match page.next_token().filter(|t| !t.is_empty()) {
                // A token already followed would page for ever: what was read is all there is.
                Some(next) if tokens_seen.insert(next.to_owned()) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        // Token counts are whole; CloudWatch carries them as doubles, exact up to 2^53.
        Ok(sums.into_iter().map(|(id, sum)| (id, sum.max(0.0).round() as u64)).collect())
    }

    fn refused(&self, code: &str, why: &str) -> ReadError {
        ReadError { region: self.region.clone(), why: format!("{code}: {why}") }
    }

    /// What to say of a failed call: the service's error code and message with a hint, or the SDK's account of
    /// why no answer came (no credentials, no connection). Neither carries a secret: AWS never echoes one, and
    /// the credential chain's errors name sources, not values.
    fn error(&self, e: &SdkError<GetMetricDataError, HttpResponse>) -> ReadError {
        let why = match e {
            SdkError::ServiceError(service) => {
                let err = service.err();
                let raw = service.raw();
                let body = raw.body().bytes().map(String::from_utf8_lossy).unwrap_or_default();
                // An error body the SDK could not read (another XML shape, say): its code and message by hand.
                let code = err.code().map(str::to_owned).or_else(|| element(&body, "Code"));
                let message = err.message().map(str::to_owned).or_else(|| element(&body, "Message"));
                let status = raw.status().as_u16();
                match code {
                    Some(code) => {
                        let message = message.unwrap_or_else(|| "(no message)".into());
                        format!("{code}: {message} (HTTP {status}){}", hint(&code))
                    }
                    None => format!("HTTP {status} with no error code"),
                }
            }
            other => {
                let chain = crate::proxy::access_log::error_chain(other);
                let no_credentials = crate::error::chain(other)
                    .any(|e| matches!(e.downcast_ref(), Some(CredentialsError::CredentialsNotLoaded(_))));
                if no_credentials {
                    format!(
                        "{chain} (no AWS credentials: the chain looks in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the \
                         shared profile, a web identity token, the container credentials endpoint and EC2 instance \
                         metadata)"
                    )
                } else {
                    chain
                }
            }
        };
        ReadError { region: self.region.clone(), why }
    }
}

/// The text of the first `<name>` element of an XML error body.
fn element(body: &str, name: &str) -> Option<String> {
    let start = body.find(&format!("<{name}>"))? + name.len() + 2;
    let end = body[start..].find(&format!("</{name}>"))? + start;
    Some(body[start..end].trim().to_owned()).filter(|text| !text.is_empty())
}

/// What an AWS error code means here.
fn hint(code: &str) -> &'static str {
    match code {
        "AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation" => {
            " (the credentials need cloudwatch:GetMetricData; README.md, \"Reconciliation against AWS\", has the policy)"
        }
        "InvalidClientTokenId" | "UnrecognizedClientException" => " (AWS does not know the access key)",
        "SignatureDoesNotMatch" | "IncompleteSignature" => " (the secret key does not belong to the access key)",
        "ExpiredToken" | "ExpiredTokenException" | "RequestExpired" => " (the credentials have expired)",
        _ => "",
    }
}

/// The query `id` for the sum of `metric` in `series`, by the hour.
fn query(id: String, metric: &str, series: &Series) -> MetricDataQuery {
    let mut dimensions = Vec::new();
    if let Some(project) = &series.project {
        dimensions.push(Dimension::builder().name("Project").value(project).build());
    }
    if let Some(model) = &series.model {
        dimensions.push(Dimension::builder().name("Model").value(model).build());
    }
    let metric = Metric::builder().namespace(NAMESPACE).metric_name(metric).set_dimensions(Some(dimensions)).build();
    let period = i32::try_from(PERIOD.as_secs()).unwrap_or(3600);
    let stat = MetricStat::builder().metric(metric).period(period).stat("Sum").build();
    MetricDataQuery::builder().id(id).metric_stat(stat).return_data(true).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_ask_for_hourly_sums_with_the_series_dimensions() {
        let series = Series { project: Some("proj_a".into()), model: Some("openai.gpt-oss-120b".into()) };
        let q = query("i0".into(), "TotalInputTokens", &series);
        let stat = q.metric_stat().expect("a metric stat");
        assert_eq!((q.id(), stat.period(), stat.stat()), (Some("i0"), Some(3600), Some("Sum")));
        let metric = stat.metric().expect("metric");
        assert_eq!((metric.namespace(), metric.metric_name()), (Some(NAMESPACE), Some("TotalInputTokens")));
        let dims: Vec<(Option<&str>, Option<&str>)> =
            metric.dimensions().iter().map(|d| (d.name(), d.value())).collect();
        assert_eq!(dims, [(Some("Project"), Some("proj_a")), (Some("Model"), Some("openai.gpt-oss-120b"))]);
        let account = query("o1".into(), "TotalOutputTokens", &Series { project: None, model: None });
        assert!(account.metric_stat().and_then(MetricStat::metric).expect("metric").dimensions().is_empty());
    }

    #[test]
    fn refusals_say_what_to_fix() {
        assert!(hint("AccessDenied").contains("cloudwatch:GetMetricData"));
        assert!(hint("SignatureDoesNotMatch").contains("secret key"));
        assert_eq!(hint("Throttling"), "");
        let body = "<ErrorResponse><Errors><Error><Code>AccessDenied</Code><Message> not allowed </Message></Error></Errors></ErrorResponse>";
        assert_eq!(element(body, "Code").as_deref(), Some("AccessDenied"));
        assert_eq!(element(body, "Message").as_deref(), Some("not allowed"));
        assert_eq!(element("<Code></Code>", "Code"), None);
        assert_eq!(element("{}", "Code"), None);
    }
}
