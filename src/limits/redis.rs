//! The Redis backend: counters every replica shares, admitted and settled in one round trip each (a Lua script
//! checks and reserves every limit of a request atomically, and another replaces the reservation by the usage).
//!
//! Keys, all under the hash tag `{mantlegate}` (one Redis Cluster slot, so a script may touch any of them):
//! - `{mantlegate}:c:<subject>:<window>:<req|in|out|usd>`: a counter, expiring after its window;
//! - `{mantlegate}:r:<hold id>`: a reservation, a hash of counter -> amount reserved, listed in the sorted set
//!   `{mantlegate}:reservations` by expiry; every admission and the sweeper release those past it;
//! - `{mantlegate}:settled:<hold id>`: a settle done (for two days), so a settle retried counts once;
//! - `{mantlegate}:seeded:<instance>`: this replica's ledger is counted. Missing (Redis flushed, or restarted
//!   without its data), admissions stop until the replica has added its ledger's sums again, once.
//!
//! While Redis cannot be reached, nothing waits on it: the first failure marks it down, requests get
//! `limits.on_backend_error` at once, a probe reconnects in the background, and settles that failed are kept
//! and replayed once it is back.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Admit, Amounts, Counted, Hold, StoreError, Windows};
use crate::config::Secret;
use crate::config::limits::Kind;
use crate::metering::metrics::LimitCounters;
use crate::record::Followup;
use crate::snapshot::Snapshot;

/// Releases one reservation: takes back what it holds from each counter that still exists (a window that has
/// ended has nothing to take back from), and forgets it.
const RELEASE: &str = r"
local function release(reservations, hash)
  local fields = redis.call('HGETALL', hash)
  for i = 1, #fields, 2 do
    if redis.call('EXISTS', fields[i]) == 1 then
      redis.call('DECRBY', fields[i], fields[i + 1])
    end
  end
  redis.call('DEL', hash)
  redis.call('ZREM', reservations, hash)
end
local function sweep(reservations, now, most)
  for _, hash in ipairs(redis.call('ZRANGEBYSCORE', reservations, '-inf', now, 'LIMIT', 0, most)) do
    release(reservations, hash)
  end
end
";

/// KEYS: reservations, this instance's seeded marker, the reservation, then the counters.
/// ARGV: now (ms), expiry (ms), then five per counter: amount, ttl (s), limit, reserve (1/0), check (0: no; 1:
/// the amount must fit; 2: it must fit, and the limit must not be reached already: a spent budget).
/// Returns `{0}` admitted, `{1, counter index, used}` refused, `{2}` unseeded.
const ADMIT: &str = r"
sweep(KEYS[1], ARGV[1], 100)
if redis.call('EXISTS', KEYS[2]) == 0 then return {2} end
local n = #KEYS - 3
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local check = ARGV[a + 5]
  if check ~= '0' then
    local used = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
    local limit = tonumber(ARGV[a + 3])
    if used + tonumber(ARGV[a + 1]) > limit or (check == '2' and used >= limit) then return {1, i - 1, used} end
  end
end
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local key, amount = KEYS[3 + i], ARGV[a + 1]
  if amount ~= '0' then
    redis.call('INCRBY', key, amount)
    redis.call('EXPIRE', key, ARGV[a + 2])
    if ARGV[a + 4] == '1' then redis.call('HSET', KEYS[3], key, amount) end
  end
end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('ZADD', KEYS[1], ARGV[2], KEYS[3]) end
return {0}
";

/// KEYS: reservations, the reservation, its settled marker, this instance's seeded marker, then the counters.
/// ARGV: the marker's ttl (s), then two per counter: amount, ttl (s).
/// Returns 1 settled, 0 settled before, 2 released only (the store lost its counts: the rebuild from the ledger
/// counts this request).
const SETTLE: &str = r"
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then release(KEYS[1], KEYS[2]) end
if redis.call('EXISTS', KEYS[4]) == 0 then return 2 end
for i = 5, #KEYS do
  local a = 2 + (i - 5) * 2
  if ARGV[a] ~= '0' then
    redis.call('INCRBY', KEYS[i], ARGV[a])
    redis.call('EXPIRE', KEYS[i], ARGV[a + 1])
  end
end
return 1
";

/// KEYS: reservations, then counters to read. ARGV: now (ms). Returns the reservations held, then each counter.
const SWEEP: &str = r"
sweep(KEYS[1], ARGV[1], 1000)
local out = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do out[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
return out
";

/// KEYS: this instance's seeded marker, then counters. ARGV: two per counter: amount, ttl (s).
/// Returns 1 added, 0 already counted.
const SEED: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX') then return 0 end
for i = 2, #KEYS do
  local a = (i - 2) * 2 + 1
  if ARGV[a] ~= '0' then
    redis.call('INCRBY', KEYS[i], ARGV[a])
    redis.call('EXPIRE', KEYS[i], ARGV[a + 1])
  end
end
return 1
";

struct Scripts {
    admit: redis::Script,
    settle: redis::Script,
    sweep: redis::Script,
    seed: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    admit: redis::Script::new(&format!("{RELEASE}{ADMIT}")),
    settle: redis::Script::new(&format!("{RELEASE}{SETTLE}")),
    sweep: redis::Script::new(&format!("{RELEASE}{SWEEP}")),
    seed: redis::Script::new(SEED),
});

const RESERVATIONS: &str = "{mantlegate}:reservations";
/// How long a settle's marker is kept: a settle retried later than this would count twice, and is dropped first.
const SETTLED_TTL: Duration = Duration::from_secs(2 * 86_400);
/// How long a failed settle is kept for replay.
const REPLAY_WITHIN: Duration = Duration::from_secs(86_400);
/// Most failed settles kept for replay; past this the oldest are dropped (and counted).
const REPLAY_MAX: usize = 100_000;
/// How often a store marked down is probed.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Counter windows' lifetimes: a minute's outlives its minute, a day's its day, a month's its month.
const MINUTE_TTL: u64 = 120;
const DAY_TTL: u64 = 2 * 86_400;
const MONTH_TTL: u64 = 62 * 86_400;

/// Characters escaped in a subject's part of a key, so that no subject can spell another's key.
const KEY_ESCAPE: &AsciiSet = &CONTROLS.add(b' ').add(b':').add(b'%').add(b'{').add(b'}');

/// A counter's key, and how long it lives.
fn counter(subject: &str, kind: Kind, w: &Windows) -> (String, u64) {
    let subject = utf8_percent_encode(subject, KEY_ESCAPE);
    match kind {
        Kind::RequestsPerMinute => (format!("{{mantlegate}}:c:{subject}:{}:req", w.minute_name()), MINUTE_TTL),
        Kind::InputTokensPerMinute => (format!("{{mantlegate}}:c:{subject}:{}:in", w.minute_name()), MINUTE_TTL),
        Kind::OutputTokensPerMinute => (format!("{{mantlegate}}:c:{subject}:{}:out", w.minute_name()), MINUTE_TTL),
        Kind::UsdPerDay => (format!("{{mantlegate}}:c:{subject}:{}:usd", w.day_name()), DAY_TTL),
        Kind::UsdPerMonth => (format!("{{mantlegate}}:c:{subject}:{}:usd", w.month_name()), MONTH_TTL),
    }
}

fn seeded_marker(instance: &str) -> String {
    format!("{{mantlegate}}:seeded:{}", utf8_percent_encode(instance, KEY_ESCAPE))
}

/// A settle the store could not take, kept for replay.
#[derive(Debug)]
struct Unsettled {
    hold: Hold,
    used: Amounts,
    at: Windows,
    since: std::time::Instant,
}

/// The Redis client and its health.
#[derive(Debug)]
pub struct RedisStore {
    conn: ConnectionManager,
    timeout: Duration,
    /// This replica's name (`limits.instance`).
    instance: Arc<str>,
    /// Where calls to Redis run.
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    up: AtomicBool,
    probing: AtomicBool,
    seeding: AtomicBool,
    /// Bumped by each rebuild that finished: requests waiting for one watch it.
    seeded: tokio::sync::watch::Sender<u64>,
    unsettled: Mutex<VecDeque<Unsettled>>,
    counters: LimitCounters,
}

impl RedisStore {
    /// A client for `url`, connecting when first used.
    pub fn new(url: &Secret, timeout: Duration, instance: &str, counters: &LimitCounters) -> anyhow::Result<Self> {
        if url.expose().starts_with("rediss://") {
            // The TLS client takes the process's default provider: ring, as everything else here (an error means
            // one is installed already).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(url.expose()).map_err(|_| {
            anyhow::anyhow!("limits: the Redis URL cannot be used (it is not shown: it may hold a password)")
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(PROBE_EVERY);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| anyhow::anyhow!("limits: cannot set up the Redis client: {:?}", e.kind()))?;
        counters.backend_up(true);
        Ok(Self {
            conn,
            timeout,
            instance: instance.into(),
            runtime: tokio::runtime::Handle::current(),
            shared: Arc::new(Shared {
                up: AtomicBool::new(true),
                probing: AtomicBool::new(false),
                seeding: AtomicBool::new(false),
                seeded: tokio::sync::watch::Sender::new(0),
                unsettled: Mutex::default(),
                counters: counters.clone(),
            }),
        })
    }

    /// Whether Redis answered last time it was asked.
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }

    /// Runs `script` with `keys` and `args`, within the timeout; a failure marks the store down.
    async fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        operation: &'static str,
        script: &'static redis::Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<T, StoreError> {
        if !self.is_up() {
            return Err(StoreError("the limits store is down".into()));
        }
        let (mut conn, timeout) = (self.conn.clone(), self.timeout);
        // On the runtime the store was made on (the gateway's control runtime), so the connection's own tasks
        // (its reader, a reconnect) live there, never on a traffic thread that may stop first at shutdown; and a
        // settle in progress finishes even if the thread that asked for it has gone.
        let call = self.runtime.spawn(async move {
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            tokio::time::timeout(timeout, invocation.invoke_async(&mut conn)).await
        });
        let answer = match call.await {
            Ok(Ok(Ok(answer))) => return Ok(answer),
            Ok(Ok(Err(e))) => e.to_string().chars().take(200).collect(),
            Ok(Err(_)) => format!("no answer within {timeout:?}"),
            Err(_) => "the gateway is shutting down".to_owned(),
        };
        self.shared.counters.backend_error(operation);
        self.down(&answer);
        Err(StoreError(answer))
    }

    /// Marks the store down (once) and starts probing it.
    fn down(&self, why: &str) {
        if self.shared.up.swap(false, Ordering::AcqRel) {
            tracing::error!(error = %why, "the limits store (Redis) cannot be reached; limits.on_backend_error applies until it is back");
            self.shared.counters.backend_up(false);
        }
        if !self.shared.probing.swap(true, Ordering::AcqRel) {
            self.runtime.spawn(probe(self.clone_handle()));
        }
    }

    /// Checks and reserves `hold` against every limit of its subjects. A store that has lost this replica's
    /// share of spend is given it from the ledger first (waiting for that at most the backend timeout).
    pub async fn admit(
        &self,
        hold: &Hold,
        billed: bool,
        expires_ms: u64,
        snapshot: &Snapshot,
    ) -> Result<Admit, StoreError> {
        let w = &hold.windows;
        let mut keys = vec![RESERVATIONS.to_owned(), seeded_marker(&self.instance), reservation(&hold.id)];
        let mut args = vec![w.now_ms.to_string(), expires_ms.to_string()];
        let mut which = Vec::new();
        for (index, counted) in hold.subjects.iter().enumerate() {
            for kind in Kind::ALL.into_iter().filter(|k| counted.counts(*k)) {
                let (key, ttl) = counter(&counted.id, kind, w);
                let amount = hold.reserved.of(kind);
                let limit = counted.limits.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n);
                let check = limit.is_some() && (amount > 0 || (billed && kind != Kind::RequestsPerMinute));
                keys.push(key);
                // Requests are counted for good at admission; tokens and spend are reserved, to be settled.
                let reserve = kind != Kind::RequestsPerMinute;
                args.extend([
                    amount.to_string(),
                    ttl.to_string(),
                    limit.unwrap_or(0).to_string(),
                    u8::from(reserve).to_string(),
                    // A spent budget stops a billed request that costs nothing by the gateway's prices.
                    match (check, kind.is_budget()) {
                        (false, _) => "0",
                        (true, false) => "1",
                        (true, true) => "2",
                    }
                    .to_owned(),
                ]);
                which.push((index, kind));
            }
        }
        for attempt in 0..2 {
            let answer: Vec<i64> = self.run("admit", &SCRIPTS.admit, keys.clone(), args.clone()).await?;
            match answer.as_slice() {
                [0] => return Ok(Admit::Admitted),
                [1, i, used] => {
                    let (index, kind) = usize::try_from(*i)
                        .ok()
                        .and_then(|i| which.get(i).copied())
                        .ok_or_else(|| StoreError("the admission script named no counter".into()))?;
                    return Ok(Admit::Refused { index, kind, used: u64::try_from(*used).unwrap_or(0) });
                }
                [2] if attempt == 0 => {
                    if !self.wait_for_seed(snapshot).await {
                        return Ok(Admit::Unseeded);
                    }
                }
                [2] => return Ok(Admit::Unseeded),
                other => return Err(StoreError(format!("the admission script answered {other:?}"))),
            }
        }
        Ok(Admit::Unseeded)
    }

    /// Starts (or joins) the rebuild of this replica's share of spend, and waits for it at most the backend
    /// timeout: whether it finished.
    async fn wait_for_seed(&self, snapshot: &Snapshot) -> bool {
        let mut seeded = self.shared.seeded.subscribe();
        seeded.mark_unchanged();
        if !self.shared.seeding.swap(true, Ordering::AcqRel) {
            let store = self.clone_handle();
            let ledger = snapshot.config.metering.ledger_path.clone();
            self.runtime.spawn(async move {
                store.seed(ledger).await;
                store.shared.seeding.store(false, Ordering::Release);
                store.shared.seeded.send_modify(|n| *n += 1);
            });
        }
        matches!(tokio::time::timeout(self.timeout, seeded.changed()).await, Ok(Ok(())))
    }

    fn clone_handle(&self) -> Self {
        Self {
            conn: self.conn.clone(),
            timeout: self.timeout,
            instance: self.instance.clone(),
            runtime: self.runtime.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Adds what this replica's ledger says was used in the open windows, unless another rebuild already has.
    async fn seed(&self, ledger: Option<std::path::PathBuf>) {
        let instance = &*self.instance;
        let now = Windows::now();
        let seeded = match ledger {
            Some(path) => match tokio::task::spawn_blocking(move || super::seed::from_ledger(&path, now)).await {
                Ok(Ok(seeded)) => seeded,
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "limits: the ledger could not be read to rebuild spend; counting from zero");
                    super::seed::Seeded { windows: now, subjects: BTreeMap::new(), lines: 0 }
                }
                Err(_) => return,
            },
            None => super::seed::Seeded { windows: now, subjects: BTreeMap::new(), lines: 0 },
        };
        let mut keys = vec![seeded_marker(instance)];
        let mut args = Vec::new();
        for (subject, sums) in &seeded.subjects {
            let amounts = [
                (Kind::RequestsPerMinute, sums.requests),
                (Kind::InputTokensPerMinute, sums.input),
                (Kind::OutputTokensPerMinute, sums.output),
                (Kind::UsdPerDay, sums.day_nanos),
                (Kind::UsdPerMonth, sums.month_nanos),
            ];
            for (kind, amount) in amounts.into_iter().filter(|(_, n)| *n > 0) {
                let (key, ttl) = counter(subject, kind, &now);
                keys.push(key);
                args.extend([amount.to_string(), ttl.to_string()]);
            }
        }
        // The script is one call however long: time it out by its size too.
        match self.run::<i64>("seed", &SCRIPTS.seed, keys, args).await {
            Ok(1) => tracing::warn!(
                instance,
                ledger_lines = seeded.lines,
                subjects = seeded.subjects.len(),
                "limits: the store had lost this replica's counts (Redis flushed or restarted empty); rebuilt them from its ledger"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "limits: the rebuild of this replica's counts failed; the next request retries it")
            }
        }
    }

    /// Settles `hold` with `used`, counted in the windows of `at`, after the request (a follow-up); one the store
    /// cannot take now is kept and replayed once it is back.
    pub fn settle(&self, hold: Hold, used: Amounts, at: Windows) -> Followup {
        let store = self.clone_handle();
        Box::pin(async move {
            let unsettled = Unsettled { hold, used, at, since: std::time::Instant::now() };
            if let Err(unsettled) = store.try_settle(unsettled).await {
                store.keep(unsettled);
            }
        })
    }

    async fn try_settle(&self, u: Unsettled) -> Result<(), Unsettled> {
        let marker = format!("{{mantlegate}}:settled:{}", utf8_percent_encode(&u.hold.id, KEY_ESCAPE));
        let mut keys = vec![RESERVATIONS.to_owned(), reservation(&u.hold.id), marker, seeded_marker(&self.instance)];
        let mut args = vec![SETTLED_TTL.as_secs().to_string()];
        for counted in &u.hold.subjects {
            for kind in Kind::ALL.into_iter().filter(|k| counted.counts(*k) && *k != Kind::RequestsPerMinute) {
                let (key, ttl) = counter(&counted.id, kind, &u.at);
                keys.push(key);
                args.extend([u.used.of(kind).to_string(), ttl.to_string()]);
            }
        }
        match self.run::<i64>("settle", &SCRIPTS.settle, keys, args).await {
            Ok(_) => Ok(()),
            Err(_) => Err(u),
        }
    }

    fn keep(&self, unsettled: Unsettled) {
        let mut kept = self.shared.unsettled.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() >= REPLAY_MAX {
            kept.pop_front();
            self.shared.counters.settle_dropped();
        }
        kept.push_back(unsettled);
    }

    /// Releases expired reservations; reads each of `rules`' limits.
    pub async fn sweep_and_read(
        &self,
        rules: &[Arc<Counted>],
        now: Windows,
    ) -> Result<BTreeMap<(Arc<str>, Kind), u64>, StoreError> {
        let mut keys = vec![RESERVATIONS.to_owned()];
        let mut which = Vec::new();
        for rule in rules {
            for (kind, _) in &rule.limits {
                keys.push(counter(&rule.id, *kind, &now).0);
                which.push((rule.id.clone(), *kind));
            }
        }
        let values: Vec<i64> = self.run("sweep", &SCRIPTS.sweep, keys, vec![now.now_ms.to_string()]).await?;
        Ok(which.into_iter().zip(values.into_iter().skip(1)).map(|(k, v)| (k, u64::try_from(v).unwrap_or(0))).collect())
    }
}

fn reservation(id: &str) -> String {
    format!("{{mantlegate}}:r:{}", utf8_percent_encode(id, KEY_ESCAPE))
}

/// Pings the store until it answers, then marks it up and replays the settles kept meanwhile.
async fn probe(store: RedisStore) {
    let shared = store.shared.clone();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    loop {
        tick.tick().await;
        let mut c = store.conn.clone();
        let ping = tokio::time::timeout(store.timeout, redis::cmd("PING").query_async::<String>(&mut c)).await;
        if matches!(ping, Ok(Ok(_))) {
            break;
        }
    }
    shared.up.store(true, Ordering::Release);
    shared.probing.store(false, Ordering::Release);
    shared.counters.backend_up(true);
    tracing::info!("the limits store (Redis) answers again");
    loop {
        let next = shared.unsettled.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
        let Some(unsettled) = next else { break };
        if unsettled.since.elapsed() > REPLAY_WITHIN {
            shared.counters.settle_dropped();
            continue;
        }
        if let Err(unsettled) = store.try_settle(unsettled).await {
            // Down again: the next probe replays it.
            let mut kept = shared.unsettled.lock().unwrap_or_else(PoisonError::into_inner);
            kept.push_front(unsettled);
            break;
        }
    }
}
