//! The two sides side by side, per project and per project and model, each row with a verdict:
//!
//! - `ok`: the counts are within the tolerance (a percentage of the larger of the two);
//! - `bypass`: AWS counted more than the gateway forwarded: traffic reached the project without the gateway;
//! - `missing`: the gateway forwarded more than AWS counted: another region or account, or metrics still late;
//! - `unattributed`: tokens in the account's `default` project, which the gateway never sends to.
//!
//! Tokens in projects neither the config nor the ledgers name show as `(other projects)`: the account's own
//! series less every project's (when CloudWatch publishes the account's series).
//!
//! Whether AWS counts cached input tokens as input is **unconfirmed**: the gateway's input (cached included, as
//! upstream's usage reports it) is compared as it is, or less its cached tokens, whichever way the totals over
//! every project are nearer; the report says which.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::ledger::{Counted, GatewayUsage};
use super::names::{DEFAULT, Form, Subject};
use crate::aws::cloudwatch::{Series, Sums};

/// The model column of a row over every model.
pub const ALL_MODELS: &str = "*";

/// The project column of the row for projects nothing here names.
pub const OTHER_PROJECTS: &str = "(other projects)";

/// A row's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Within the tolerance.
    Ok,
    /// AWS counted more: traffic reached the project without the gateway.
    Bypass,
    /// The gateway forwarded more than AWS counted.
    Missing,
    /// Tokens in the account's `default` project.
    Unattributed,
}

impl Verdict {
    /// Every verdict, in the order `/metrics` lists them.
    pub const ALL: [Self; 4] = [Self::Ok, Self::Bypass, Self::Missing, Self::Unattributed];

    /// Its name, as the report and the metrics say it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Bypass => "bypass",
            Self::Missing => "missing",
            Self::Unattributed => "unattributed",
        }
    }
}

/// Input and output tokens.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tokens {
    /// Input tokens.
    pub input: u64,
    /// Output tokens.
    pub output: u64,
}

/// AWS's count less the gateway's.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// Input tokens.
    pub input: i128,
    /// Output tokens.
    pub output: i128,
}

/// How cached input tokens were compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CachedInput {
    /// The ledgers hold no cached tokens in the window: nothing to decide.
    NoneSeen,
    /// Counted as input, as the gateway's own count does: AWS's input totals are nearer that way.
    Counted,
    /// Left out of the gateway's input: AWS's input totals are nearer that way.
    NotCounted,
}

/// One row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// The project's name (`default`, or `(other projects)`).
    pub project: String,
    /// Its id, where known.
    pub project_id: Option<String>,
    /// The model, or `*` for every model.
    pub model: String,
    /// The gateway's tokens as compared (see [`CachedInput`]).
    pub gateway: Tokens,
    /// The cached input tokens among the gateway's (in `gateway.input` unless compared without them).
    pub gateway_cached_input: u64,
    /// AWS's tokens (0 where CloudWatch has no data point).
    pub aws: Tokens,
    /// `aws - gateway`.
    pub difference: Difference,
    /// The verdict.
    pub verdict: Verdict,
}

/// Everything compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Project rows (`*`, then each model), then `default`'s, then `(other projects)`'s.
    pub rows: Vec<Row>,
    /// How cached input tokens were compared.
    pub cached_input: CachedInput,
    /// How many projects CloudWatch's `Project` dimension named by id, and how many by name.
    pub project_dimension: BTreeMap<Form, usize>,
    /// The account's own series, when CloudWatch has it.
    pub account: Option<Tokens>,
    /// The `default` project's tokens: traffic nothing attributed, upstream.
    pub unattributed_upstream: Tokens,
}

impl Comparison {
    /// Whether every row is `ok`.
    pub fn all_ok(&self) -> bool {
        self.rows.iter().all(|r| r.verdict == Verdict::Ok)
    }

    /// How many rows have each verdict.
    pub fn counts(&self) -> Vec<(Verdict, usize)> {
        Verdict::ALL.iter().map(|v| (*v, self.rows.iter().filter(|r| r.verdict == *v).count())).collect()
    }
}

/// The verdict on one count: `ok` when the two are within `tolerance` percent of the larger.
pub fn judge(gateway: u64, aws: u64, tolerance: f64) -> Verdict {
    if within(gateway, aws, tolerance) {
        Verdict::Ok
    } else if aws > gateway {
        Verdict::Bypass
    } else {
        Verdict::Missing
    }
}

fn within(a: u64, b: u64, tolerance: f64) -> bool {
    a.abs_diff(b) as f64 <= a.max(b) as f64 * tolerance / 100.0
}

/// A row's verdict from its input's and output's: any `bypass` is a bypass, else any `missing`.
pub fn combine(input: Verdict, output: Verdict) -> Verdict {
    if input == Verdict::Bypass || output == Verdict::Bypass {
        Verdict::Bypass
    } else if input == Verdict::Missing || output == Verdict::Missing {
        Verdict::Missing
    } else {
        Verdict::Ok
    }
}

/// Every series to read for `subjects`: for each, its project's and its project and model's, under each
/// dimension value that may name it; `default`'s, for every model any project saw; and the account's.
pub fn series(subjects: &[Subject]) -> Vec<Series> {
    let mut all_models: Vec<&String> = subjects.iter().flat_map(|s| &s.models).collect();
    all_models.sort();
    all_models.dedup();
    let mut series = vec![Series { project: None, model: None }];
    let mut add = |project: &str, models: &mut dyn Iterator<Item = &String>| {
        series.push(Series { project: Some(project.to_owned()), model: None });
        for model in models {
            series.push(Series { project: Some(project.to_owned()), model: Some(model.clone()) });
        }
    };
    for subject in subjects {
        for (_, value) in subject.dimension_values() {
            add(&value, &mut subject.models.iter());
        }
    }
    add(DEFAULT, &mut all_models.into_iter());
    series
}

/// Compares `gateway` with what CloudWatch said (`aws`, as read for [`series`] of `subjects`).
pub fn compare(
    subjects: &[Subject],
    gateway: &GatewayUsage,
    aws: &HashMap<Series, Sums>,
    tolerance: f64,
) -> Comparison {
    let read = |project: &str, model: Option<&str>| {
        aws.get(&Series { project: Some(project.to_owned()), model: model.map(str::to_owned) })
            .copied()
            .unwrap_or_default()
    };
    // A project's total: its own series, else (if CloudWatch publishes only the finer one) its models' summed.
    let project_total = |value: &str, models: &mut dyn Iterator<Item = &String>| -> (Tokens, bool) {
        let own = read(value, None);
        if own.has_data() {
            return (tokens(own), true);
        }
        let mut total = Tokens::default();
        let mut any = false;
        for model in models {
            let sums = read(value, Some(model));
            any |= sums.has_data();
            total = add(total, tokens(sums));
        }
        (total, any)
    };

    // Which dimension value names each subject in CloudWatch: the first (id, then name) with data.
    let mut forms: BTreeMap<Form, usize> = BTreeMap::new();
    let chosen: Vec<Option<String>> = subjects
        .iter()
        .map(|subject| {
            let found = subject
                .dimension_values()
                .into_iter()
                .find(|(_, value)| project_total(value, &mut subject.models.iter()).1);
            found.map(|(form, value)| {
                *forms.entry(form).or_default() += 1;
                value
            })
        })
        .collect();

    let totals: Vec<(Counted, Tokens)> = subjects
        .iter()
        .zip(&chosen)
        .map(|(subject, value)| {
            let aws = value.as_deref().map_or_else(Tokens::default, |v| project_total(v, &mut subject.models.iter()).0);
            (gateway.project(&subject.name), aws)
        })
        .collect();
    let cached_input = cached_convention(&totals);
    let compared = |counted: Counted| Tokens {
        input: match cached_input {
            CachedInput::NotCounted => counted.input.saturating_sub(counted.cached_input),
            _ => counted.input,
        },
        output: counted.output,
    };
    let row = |project: &str, id: Option<&String>, model: &str, counted: Counted, aws: Tokens| {
        let gateway = compared(counted);
        let verdict = combine(judge(gateway.input, aws.input, tolerance), judge(gateway.output, aws.output, tolerance));
        Row {
            project: project.to_owned(),
            project_id: id.cloned(),
            model: model.to_owned(),
            gateway,
            gateway_cached_input: counted.cached_input,
            aws,
            difference: difference(aws, gateway),
            verdict,
        }
    };

    let mut rows = Vec::new();
    let mut attributed = Tokens::default();
    for ((subject, value), (counted, aws)) in subjects.iter().zip(&chosen).zip(&totals) {
        attributed = add(attributed, *aws);
        if counted.input == 0 && counted.output == 0 && aws.input == 0 && aws.output == 0 {
            continue;
        }
        let id = subject.id.as_ref();
        rows.push(row(&subject.name, id, ALL_MODELS, *counted, *aws));
        let mut models: Vec<&String> = subject.models.iter().collect();
        models.sort();
        for model in models {
            let counted = gateway.by_model.get(&(subject.name.clone(), model.clone())).copied().unwrap_or_default();
            let aws = value.as_deref().map_or_else(Tokens::default, |v| tokens(read(v, Some(model))));
            if counted.input != 0 || counted.output != 0 || aws.input != 0 || aws.output != 0 {
                rows.push(row(&subject.name, id, model, counted, aws));
            }
        }
    }

    // `default`: every token there is traffic nothing attributed.
    let mut all_models: Vec<&String> = subjects.iter().flat_map(|s| &s.models).collect();
    all_models.sort();
    all_models.dedup();
    let (unattributed, _) = project_total(DEFAULT, &mut all_models.iter().copied());
    let flag = |aws: Tokens| if aws.input > 0 || aws.output > 0 { Verdict::Unattributed } else { Verdict::Ok };
    let upstream_only = |project: &str, model: &str, aws: Tokens, verdict: Verdict| Row {
        project: project.to_owned(),
        project_id: None,
        model: model.to_owned(),
        gateway: Tokens::default(),
        gateway_cached_input: 0,
        aws,
        difference: difference(aws, Tokens::default()),
        verdict,
    };
    rows.push(upstream_only(DEFAULT, ALL_MODELS, unattributed, flag(unattributed)));
    for model in &all_models {
        let aws = tokens(read(DEFAULT, Some(model)));
        if aws.input > 0 || aws.output > 0 {
            rows.push(upstream_only(DEFAULT, model, aws, flag(aws)));
        }
    }

    // The account's series less every project's: projects nothing here names.
    let account_sums = aws.get(&Series { project: None, model: None }).copied().unwrap_or_default();
    let account = account_sums.has_data().then(|| tokens(account_sums));
    if let Some(account) = account {
        let named = add(attributed, unattributed);
        let other = Tokens {
            input: account.input.saturating_sub(named.input),
            output: account.output.saturating_sub(named.output),
        };
        if other.input > 0 || other.output > 0 {
            // Judged against the account's total: the levels are published apart, and may differ by a little.
            let beyond =
                !within(account.input, named.input, tolerance) || !within(account.output, named.output, tolerance);
            let verdict = if beyond { Verdict::Bypass } else { Verdict::Ok };
            rows.push(upstream_only(OTHER_PROJECTS, ALL_MODELS, other, verdict));
        }
    }

    Comparison { rows, cached_input, project_dimension: forms, account, unattributed_upstream: unattributed }
}

/// How cached input tokens compare, from the projects' totals (gateway, AWS): whichever way AWS's input total is
/// nearer the gateway's (counted, on a tie).
fn cached_convention(totals: &[(Counted, Tokens)]) -> CachedInput {
    let (mut input, mut cached, mut aws) = (0u64, 0u64, 0u64);
    for (counted, theirs) in totals {
        input = input.saturating_add(counted.input);
        cached = cached.saturating_add(counted.cached_input);
        aws = aws.saturating_add(theirs.input);
    }
    if cached == 0 {
        CachedInput::NoneSeen
    } else if aws.abs_diff(input.saturating_sub(cached)) < aws.abs_diff(input) {
        CachedInput::NotCounted
    } else {
        CachedInput::Counted
    }
}

fn tokens(sums: Sums) -> Tokens {
    Tokens { input: sums.input.unwrap_or(0), output: sums.output.unwrap_or(0) }
}

fn add(a: Tokens, b: Tokens) -> Tokens {
    Tokens { input: a.input.saturating_add(b.input), output: a.output.saturating_add(b.output) }
}

fn difference(aws: Tokens, gateway: Tokens) -> Difference {
    Difference {
        input: i128::from(aws.input) - i128::from(gateway.input),
        output: i128::from(aws.output) - i128::from(gateway.output),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn verdicts_follow_the_tolerance_and_the_direction() {
        assert_eq!(judge(1000, 1000, 0.0), Verdict::Ok);
        assert_eq!(judge(1000, 1001, 0.0), Verdict::Bypass);
        // 2% of the larger: 20 of 1000.
        assert_eq!(judge(980, 1000, 2.0), Verdict::Ok);
        assert_eq!(judge(979, 1000, 2.0), Verdict::Bypass);
        assert_eq!(judge(1000, 980, 2.0), Verdict::Ok);
        assert_eq!(judge(1000, 979, 2.0), Verdict::Missing);
        assert_eq!(judge(0, 0, 2.0), Verdict::Ok);
        assert_eq!(judge(0, 1, 2.0), Verdict::Bypass, "any tokens beside none are beyond a percentage");
        assert_eq!(judge(5, 0, 50.0), Verdict::Missing);
        assert_eq!(combine(Verdict::Ok, Verdict::Ok), Verdict::Ok);
        assert_eq!(combine(Verdict::Missing, Verdict::Ok), Verdict::Missing);
        assert_eq!(combine(Verdict::Missing, Verdict::Bypass), Verdict::Bypass);
    }

    fn subject(name: &str, id: Option<&str>, models: &[&str]) -> Subject {
        Subject { name: name.into(), id: id.map(Into::into), models: models.iter().map(|m| (*m).to_owned()).collect() }
    }

    fn usage(entries: &[(&str, &str, u64, u64, u64)]) -> GatewayUsage {
        let mut usage = GatewayUsage::default();
        for (project, model, input, output, cached_input) in entries {
            usage.by_model.insert(
                ((*project).to_owned(), (*model).to_owned()),
                Counted { input: *input, output: *output, cached_input: *cached_input },
            );
        }
        usage
    }

    fn at(project: Option<&str>, model: Option<&str>, input: u64, output: u64) -> (Series, Sums) {
        (
            Series { project: project.map(Into::into), model: model.map(Into::into) },
            Sums { input: Some(input), output: Some(output) },
        )
    }

    #[test]
    fn the_series_read_are_every_projects_under_each_name_with_default_and_the_account() {
        let subjects = [subject("Chat", Some("proj_chat"), &["m1"]), subject("Search", None, &["m2"])];
        let read: BTreeSet<(Option<String>, Option<String>)> =
            series(&subjects).into_iter().map(|s| (s.project, s.model)).collect();
        let p = |p: &str, m: Option<&str>| (Some(p.to_owned()), m.map(str::to_owned));
        let want = BTreeSet::from([
            (None, None),
            p("proj_chat", None),
            p("proj_chat", Some("m1")),
            p("Chat", None),
            p("Chat", Some("m1")),
            p("Search", None),
            p("Search", Some("m2")),
            p("default", None),
            p("default", Some("m1")),
            p("default", Some("m2")),
        ]);
        assert_eq!(read, want);
    }

    #[test]
    fn each_verdict_comes_from_the_data() {
        let subjects = [
            subject("Chat", Some("proj_chat"), &["m1", "m2"]),
            subject("Search", Some("proj_search"), &["m1"]),
            subject("Labs", Some("proj_labs"), &["m1"]),
        ];
        let gateway = usage(&[
            ("Chat", "m1", 1000, 100, 0),
            ("Chat", "m2", 500, 50, 0),
            ("Search", "m1", 300, 30, 0),
            ("Labs", "m1", 800, 80, 0),
        ]);
        // CloudWatch names projects by id here: the names' series are empty.
        let aws: HashMap<Series, Sums> = [
            at(Some("proj_chat"), None, 1505, 150),
            at(Some("proj_chat"), Some("m1"), 1005, 100),
            at(Some("proj_chat"), Some("m2"), 500, 50),
            // Someone else's traffic in Search, beside the gateway's.
            at(Some("proj_search"), None, 900, 30),
            at(Some("proj_search"), Some("m1"), 900, 30),
            // Labs's traffic never reached this account and region.
            at(Some("default"), None, 70, 7),
            at(Some("default"), Some("m1"), 70, 7),
            at(None, None, 1505 + 900 + 70 + 400, 150 + 30 + 7 + 40),
        ]
        .into();
        let c = compare(&subjects, &gateway, &aws, 2.0);
        let verdict = |project: &str, model: &str| {
            c.rows.iter().find(|r| r.project == project && r.model == model).map(|r| r.verdict)
        };
        assert_eq!(verdict("Chat", "*"), Some(Verdict::Ok));
        assert_eq!(verdict("Chat", "m1"), Some(Verdict::Ok), "5 of 1005 is within 2%");
        assert_eq!(verdict("Search", "*"), Some(Verdict::Bypass));
        assert_eq!(verdict("Labs", "*"), Some(Verdict::Missing));
        assert_eq!(verdict("default", "*"), Some(Verdict::Unattributed));
        assert_eq!(verdict("default", "m1"), Some(Verdict::Unattributed));
        assert_eq!(verdict(OTHER_PROJECTS, "*"), Some(Verdict::Bypass));
        let other = c.rows.iter().find(|r| r.project == OTHER_PROJECTS).expect("other projects");
        assert_eq!(other.aws, Tokens { input: 400, output: 40 });
        let search = c.rows.iter().find(|r| r.project == "Search").expect("search");
        assert_eq!(search.difference, Difference { input: 600, output: 0 });
        assert_eq!(search.project_id.as_deref(), Some("proj_search"));
        assert_eq!(c.project_dimension.get(&Form::Id), Some(&2), "Labs had no data under either");
        assert_eq!(c.unattributed_upstream, Tokens { input: 70, output: 7 });
        assert!(!c.all_ok());
        assert_eq!(
            c.counts(),
            [(Verdict::Ok, 3), (Verdict::Bypass, 3), (Verdict::Missing, 2), (Verdict::Unattributed, 2)]
        );
    }

    #[test]
    fn projects_named_by_name_and_an_empty_default_are_ok() {
        let subjects = [subject("Chat", Some("proj_chat"), &["m1"])];
        let gateway = usage(&[("Chat", "m1", 1000, 100, 0)]);
        let aws: HashMap<Series, Sums> =
            [at(Some("Chat"), None, 1000, 100), at(Some("Chat"), Some("m1"), 1000, 100), at(None, None, 1000, 100)]
                .into();
        let c = compare(&subjects, &gateway, &aws, 0.0);
        assert!(c.all_ok(), "{:#?}", c.rows);
        assert_eq!(c.project_dimension.get(&Form::Name), Some(&1));
        assert_eq!(c.rows.iter().filter(|r| r.project == OTHER_PROJECTS).count(), 0, "nothing left over");
        let default = c.rows.iter().find(|r| r.project == DEFAULT).expect("default is always shown");
        assert_eq!((default.aws, default.verdict), (Tokens::default(), Verdict::Ok));
        // Without the account's series, projects nothing names cannot be checked, and are not guessed at.
        let aws: HashMap<Series, Sums> = [at(Some("Chat"), None, 1000, 100)].into();
        assert_eq!(compare(&subjects, &gateway, &aws, 0.0).account, None);
    }

    #[test]
    fn a_project_published_only_per_model_is_totalled_from_its_models() {
        let subjects = [subject("Chat", Some("proj_chat"), &["m1", "m2"])];
        let gateway = usage(&[("Chat", "m1", 10, 1, 0), ("Chat", "m2", 20, 2, 0)]);
        let aws: HashMap<Series, Sums> =
            [at(Some("proj_chat"), Some("m1"), 10, 1), at(Some("proj_chat"), Some("m2"), 20, 2)].into();
        let c = compare(&subjects, &gateway, &aws, 0.0);
        assert_eq!(c.rows[0].aws, Tokens { input: 30, output: 3 });
        assert!(c.all_ok(), "{:#?}", c.rows);
    }

    #[test]
    fn cached_input_is_compared_the_way_the_totals_match() {
        let subjects = [subject("Chat", Some("proj_chat"), &["m1"])];
        let gateway = usage(&[("Chat", "m1", 1000, 100, 400)]);
        let with = |input: u64| -> HashMap<Series, Sums> {
            [at(Some("proj_chat"), None, input, 100), at(Some("proj_chat"), Some("m1"), input, 100)].into()
        };
        let counted = compare(&subjects, &gateway, &with(1000), 1.0);
        assert_eq!((counted.cached_input, counted.all_ok()), (CachedInput::Counted, true));
        let not_counted = compare(&subjects, &gateway, &with(600), 1.0);
        assert_eq!((not_counted.cached_input, not_counted.all_ok()), (CachedInput::NotCounted, true));
        assert_eq!(not_counted.rows[0].gateway.input, 600);
        assert_eq!(not_counted.rows[0].gateway_cached_input, 400);
        // Nearer without them: compared without them, and 5 tokens beyond a tolerance of 0 are a bypass.
        let tight = compare(&subjects, &gateway, &with(605), 0.0);
        assert_eq!((tight.cached_input, tight.rows[0].verdict), (CachedInput::NotCounted, Verdict::Bypass));
        // Nearer with them: 2000 is a bypass either way.
        let more = compare(&subjects, &gateway, &with(2000), 1.0);
        assert_eq!((more.cached_input, more.rows[0].verdict), (CachedInput::Counted, Verdict::Bypass));
        let no_cache = compare(&subjects, &usage(&[("Chat", "m1", 1000, 100, 0)]), &with(1000), 1.0);
        assert_eq!(no_cache.cached_input, CachedInput::NoneSeen);
    }
}
