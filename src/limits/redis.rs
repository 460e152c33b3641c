//! The Redis backend: counters every replica shares, admitted and settled in one round trip each (a Lua script
//! checks and reserves every limit of a request atomically, and another replaces the reservation by the usage).
//!
//! Keys, all under the hash tag `{mantlegate}` (one Redis Cluster slot, so a script may touch any of them):
//! - `{mantlegate}:c:<subject>:<window>:<req|in|out|usd>`: a counter, expiring after its window;
//! - `{mantlegate}:r:<hold id>`: a billed request's reservation, a hash of counter -> amount reserved, listed in
//!   the sorted set `{mantlegate}:reservations` by expiry (by Redis's clock); admissions and each replica's
//!   sweeper release those past it, leaving a tombstone `{mantlegate}:t:<hold id>` for a day. A settle counts
//!   only if it finds the reservation or its tombstone (and deletes it), so a settle replayed counts once, and
//!   no key is left per request;
//! - `{mantlegate}:done:<hold id>`: the settle of a request admitted while Redis could not be reached (it has
//!   no reservation to find), for two days;
//! - `{mantlegate}:seeded:<ledger id>`: this replica's ledger is counted, up to the time it holds. Missing (a new
//!   store, or one flushed or restarted without its data), admissions wait until the replica has added its
//!   ledger's sums, once; settles of requests that ended before that time were in the ledger, and only release.
//!
//! While Redis cannot be reached, nothing waits on it: the first failure marks it down, requests get
//! `limits.on_backend_error` at once, a probe reconnects in the background (on a new connection), and settles
//! that failed are kept and replayed once it is back.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Admit, Amounts, Counted, Hold, StoreError, Windows};
use crate::config::Secret;
use crate::config::limits::Kind;
use crate::metering::ledger::Ledger;
use crate::metering::metrics::LimitCounters;
use crate::record::Followup;
use crate::snapshot::Snapshot;

/// Redis's own clock, in milliseconds: reservations expire by one clock whichever replica made them.
const NOW: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
";

/// Adds usage to counters (a settle, a rebuild): each counter from `KEYS[first_key]` on, with two arguments from
/// `ARGV[first_arg]` on, its amount and its time to live (s).
const ADD: &str = r"
local function add(first_key, first_arg)
  for i = first_key, #KEYS do
    local a = first_arg + (i - first_key) * 2
    if ARGV[a] ~= '0' then
      redis.call('INCRBY', KEYS[i], ARGV[a])
      redis.call('EXPIRE', KEYS[i], ARGV[a + 1])
    end
  end
end
";

/// Releases one reservation: takes back what it holds from each counter that still exists (a window that has
/// ended has nothing to take back from), and forgets it. A reservation swept at its expiry leaves a tombstone for
/// a day, so a settle that comes after it still counts its usage (once).
const RELEASE: &str = r"
local function release(reservations, hash)
  local fields = redis.call('HGETALL', hash)
  for i = 1, #fields, 2 do
    if fields[i] ~= '@' and redis.call('EXISTS', fields[i]) == 1 then
      redis.call('DECRBY', fields[i], fields[i + 1])
    end
  end
  redis.call('DEL', hash)
  redis.call('ZREM', reservations, hash)
end
local function sweep(reservations, now, most)
  for _, hash in ipairs(redis.call('ZRANGEBYSCORE', reservations, '-inf', now, 'LIMIT', 0, most)) do
    release(reservations, hash)
    redis.call('SET', '{mantlegate}:t:' .. string.sub(hash, 16), '1', 'EX', 86400)
  end
end
";

/// KEYS: reservations, this ledger's seeded marker, the reservation, then the counters.
/// ARGV: ttl (ms), billed (1/0), then five per counter: amount, ttl (s), limit, reserve (1/0), check (0: no; 1:
/// the amount must fit; 2: it must fit, and the limit must not be reached already: a spent budget).
/// Returns `{0}` admitted, `{1, counter index, used}` refused, `{2}` unseeded.
const ADMIT: &str = r"
sweep(KEYS[1], now, 100)
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
-- A billed request's reservation exists until it is settled (or swept), even if it reserved nothing: that is
-- how a settle knows it has not been counted yet.
if ARGV[2] == '1' then redis.call('HSET', KEYS[3], '@', '1') end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), KEYS[3]) end
return {0}
";

/// KEYS: reservations, the reservation, its tombstone, its done marker, this ledger's seeded marker, then the
/// counters. ARGV: in store (1/0), when it ended (ms), the done marker's ttl (s), then two per counter: amount,
/// ttl (s).
/// Returns 1 counted; 0 nothing to do (settled before); 2 the store has lost its counts, nothing done (replay it
/// after the rebuild); 3 released only (the rebuild read it from the ledger).
const SETTLE: &str = r"
local cut = redis.call('GET', KEYS[5])
if not cut then return 2 end
local counted
if redis.call('EXISTS', KEYS[2]) == 1 then
  release(KEYS[1], KEYS[2])
  counted = true
elseif redis.call('DEL', KEYS[3]) == 1 then
  counted = true
elseif ARGV[1] == '0' then
  -- Admitted while the store could not be reached: nothing in it says whether this was counted, but this.
  counted = redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[3]) and true or false
else
  counted = false
end
if not counted then return 0 end
if tonumber(ARGV[2]) <= tonumber(cut) then return 3 end
add(6, 4)
return 1
";

/// KEYS: reservations, this ledger's seeded marker, then counters to read. ARGV: sweep (1/0).
/// Returns whether the marker exists, the reservations held, then each counter.
const SWEEP: &str = r"
if ARGV[1] == '1' then sweep(KEYS[1], now, 1000) end
local out = {redis.call('EXISTS', KEYS[2]), redis.call('ZCARD', KEYS[1])}
for i = 3, #KEYS do out[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
return out
";

/// KEYS: this ledger's seeded marker, then counters. ARGV: the time up to which the ledger was read (ms), then two
/// per counter: amount, ttl (s). Returns 1 added, 0 already counted.
const SEED: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
add(2, 2)
return 1
";

struct Scripts {
    admit: redis::Script,
    settle: redis::Script,
    sweep: redis::Script,
    seed: redis::Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    admit: redis::Script::new(&format!("{NOW}{RELEASE}{ADMIT}")),
    settle: redis::Script::new(&format!("{ADD}{RELEASE}{SETTLE}")),
    sweep: redis::Script::new(&format!("{NOW}{RELEASE}{SWEEP}")),
    seed: redis::Script::new(&format!("{ADD}{SEED}")),
});

const RESERVATIONS: &str = "{mantlegate}:reservations";
/// How long a failed settle is kept for replay.
const REPLAY_WITHIN: Duration = Duration::from_secs(86_400);
/// Error answers (not outages) after which a kept settle is dropped (and counted).
const REPLAY_TRIES: u32 = 60;
/// How long a stopping gateway replays kept settles before it writes the rest beside its ledger.
const FINISH_REPLAY: Duration = Duration::from_secs(3);
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

fn seeded_marker(source: &str) -> String {
    format!("{{mantlegate}}:seeded:{}", utf8_percent_encode(source, KEY_ESCAPE))
}

fn reservation(id: &str) -> String {
    format!("{{mantlegate}}:r:{}", utf8_percent_encode(id, KEY_ESCAPE))
}

fn tombstone(id: &str) -> String {
    format!("{{mantlegate}}:t:{}", utf8_percent_encode(id, KEY_ESCAPE))
}

fn done_marker(id: &str) -> String {
    format!("{{mantlegate}}:done:{}", utf8_percent_encode(id, KEY_ESCAPE))
}

/// The settles a gateway stopped with, kept beside its ledger for the next process on it: each process writes
/// what it still holds at shutdown to `<ledger>.unsettled.<process>` (one JSON call a line), and each process
/// takes every such file at start (into one file of its own, removed once all it took is made). A settle counts
/// once however often it is replayed, so a file two processes both took costs a replay, never a double count.
#[derive(Debug)]
struct KeptFiles {
    /// The ledger's directory.
    dir: PathBuf,
    /// `<ledger file name>.unsettled.`: what every such file's name begins with.
    prefix: String,
    /// This process's file.
    own: PathBuf,
}

impl KeptFiles {
    fn new(ledger: &Path) -> Self {
        let dir = ledger.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned();
        let name = ledger.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let prefix = format!("{name}.unsettled.");
        let own = dir.join(format!("{prefix}{}", uuid::Uuid::new_v4().simple()));
        Self { dir, prefix, own }
    }

    /// Takes the settles stopped processes left: read, written to this process's own file, and their files
    /// removed. Calls made for another version of the settle script, and lines that cannot be read, are
    /// skipped and said.
    fn take(&self, counters: &LimitCounters) -> anyhow::Result<VecDeque<Unsettled>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&self.prefix) && !n.ends_with(".partial"))
            })
            .collect();
        files.sort();
        let (mut kept, mut unreadable) = (VecDeque::new(), 0usize);
        for file in &files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("limits: cannot read {}: {e}", file.display()))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                match serde_json::from_str::<Unsettled>(line) {
                    Ok(u) if u.script == SCRIPTS.settle.get_hash() => kept.push_back(u),
                    _ => unreadable += 1,
                }
            }
        }
        if unreadable > 0 {
            tracing::warn!(dir = %self.dir.display(), unreadable, "limits: settles a stopped process kept cannot be replayed (unreadable, or made for another version)");
            for _ in 0..unreadable {
                counters.settle_dropped();
            }
        }
        if files.is_empty() {
            return Ok(kept);
        }
        self.write(&kept).map_err(|e| anyhow::anyhow!("limits: cannot write {}: {e}", self.own.display()))?;
        for file in files {
            let _ = std::fs::remove_file(file);
        }
        if !kept.is_empty() {
            tracing::info!(file = %self.own.display(), settles = kept.len(), "limits: settles stopped processes could not make are replayed once Redis takes them");
        }
        Ok(kept)
    }

    /// Writes `kept` to this process's file whole and durably (a new file, synced, renamed over the old), or
    /// removes the file when there is none.
    fn write(&self, kept: &VecDeque<Unsettled>) -> std::io::Result<()> {
        if kept.is_empty() {
            return match std::fs::remove_file(&self.own) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let mut text = String::new();
        for unsettled in kept {
            text.push_str(&serde_json::to_string(unsettled).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        let mut partial = self.own.as_os_str().to_owned();
        partial.push(".partial");
        let mut file = std::fs::File::create(&partial)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&partial, &self.own)
    }
}

/// What names this replica's share of the counts in Redis: its ledger's id (kept in `<ledger>.id`, made once),
/// so that a replica renamed, or a container made again over the same ledger, is never counted twice; without a
/// ledger, its instance name.
fn source_of(ledger: Option<&Path>, instance: &str) -> anyhow::Result<String> {
    let Some(ledger) = ledger else { return Ok(format!("instance:{instance}")) };
    let mut name = ledger.as_os_str().to_owned();
    name.push(".id");
    let path = std::path::PathBuf::from(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("limits: cannot create {}: {e}", dir.display()))?;
    }
    let made = format!("ledger:{}\n", uuid::Uuid::new_v4().simple());
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(mut file) => {
            std::io::Write::write_all(&mut file, made.as_bytes())
                .map_err(|e| anyhow::anyhow!("limits: cannot write {}: {e}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => anyhow::bail!("limits: cannot create {}: {e}", path.display()),
    }
    let id =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("limits: cannot read {}: {e}", path.display()))?;
    match id.trim() {
        "" => anyhow::bail!("limits: {} is empty (remove it: a new id is made)", path.display()),
        id => Ok(id.to_owned()),
    }
}

/// A settle not yet taken by the store, kept for replay: the settle script's keys and arguments (so a replay
/// after a restart, or by a process with other rules, is the same call), and when its request ended.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Unsettled {
    keys: Vec<String>,
    args: Vec<String>,
    /// When its request ended, in ms since the epoch.
    ended_ms: u64,
    /// The settle script's hash: a call kept by another version is not replayed into this one's script.
    script: String,
    /// Replays Redis answered with an error (not an outage).
    #[serde(default)]
    tries: u32,
}

/// The Redis client and its health. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RedisStore(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Replaced by a new one each time the store comes back from an outage, so a connection left hanging on a
    /// socket that went dead (a Redis that moved, a partition) is never used again.
    conn: Mutex<ConnectionManager>,
    timeout: Duration,
    /// This replica's seeded marker (see [`source_of`]).
    marker: String,
    /// What its holds' names begin with: its instance and a random nonce, new with each process.
    holds: String,
    /// Where calls to Redis run: the gateway's control runtime, so the connection's own tasks (its reader, a
    /// reconnect) never live on a traffic thread that may stop first at shutdown, and a call in progress finishes
    /// even if the request that made it has gone.
    runtime: tokio::runtime::Handle,
    up: AtomicBool,
    probing: AtomicBool,
    seeding: AtomicBool,
    /// Held by the replay in progress (one at a time: the sweeper, the probe and a rebuild may each start one),
    /// and by `finish` from its start on.
    replaying: tokio::sync::Mutex<()>,
    /// Set when shutdown begins: a replay in progress stops after its current call, and none starts.
    finishing: AtomicBool,
    /// Set once `finish` has written what is kept: a settle kept later is lost, and counted so.
    finished: AtomicBool,
    /// Bumped by each rebuild that finished: requests waiting for one watch it.
    seeded: tokio::sync::watch::Sender<u64>,
    unsettled: Mutex<VecDeque<Unsettled>>,
    /// Where the settles kept at shutdown are written, if there is a ledger.
    kept_files: Option<KeptFiles>,
    counters: LimitCounters,
}

/// How late a caller may wait for a call beyond the backend timeout (the call's task must first be run).
const SLACK: Duration = Duration::from_millis(50);
/// How long a rebuild waits for the ledger writer to write out the lines appended before it.
const LEDGER_FLUSH: Duration = Duration::from_secs(2);

impl RedisStore {
    /// A client for `url`, connecting when first used; this replica's share of the counts is named after its
    /// `ledger` (else `instance`).
    pub fn new(
        url: &Secret,
        timeout: Duration,
        ledger: Option<&Path>,
        instance: &str,
        holds: String,
        counters: &LimitCounters,
    ) -> anyhow::Result<Self> {
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
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| anyhow::anyhow!("limits: cannot set up the Redis client: {:?}", e.kind()))?;
        counters.backend_up(true);
        let kept_files = ledger.map(KeptFiles::new);
        let unsettled = kept_files.as_ref().map(|f| f.take(counters)).transpose()?.unwrap_or_default();
        Ok(Self(Arc::new(Inner {
            client,
            config,
            conn: Mutex::new(conn),
            timeout,
            marker: seeded_marker(&source_of(ledger, instance)?),
            holds,
            runtime: tokio::runtime::Handle::current(),
            up: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            seeding: AtomicBool::new(false),
            replaying: tokio::sync::Mutex::new(()),
            finishing: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            seeded: tokio::sync::watch::Sender::new(0),
            unsettled: Mutex::new(unsettled),
            kept_files,
            counters: counters.clone(),
        })))
    }

    /// Whether Redis answered last time it was asked.
    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Acquire)
    }

    /// A hold's name in Redis: unique across replicas and restarts.
    fn hold_id(&self, hold: &Hold) -> String {
        format!("{}:{}", self.0.holds, hold.id)
    }

    fn conn(&self) -> ConnectionManager {
        self.0.conn.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Runs `script` with `keys` and `args`, within the timeout, on the control runtime. A connection's failure
    /// (refused, dropped, timed out) marks the store down; an error answer (a full Redis refusing writes, say)
    /// fails this call only.
    async fn invoke<T: redis::FromRedisValue + Send + 'static>(
        &self,
        operation: &'static str,
        script: &'static redis::Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, StoreError> {
        if !self.is_up() {
            return Err(StoreError::new("the limits store is down"));
        }
        let (mut conn, timeout) = (self.conn(), self.0.timeout);
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let (why, down) = match tokio::time::timeout(timeout, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => {
                let down = e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal();
                (e.to_string().chars().take(200).collect::<String>(), down)
            }
            Err(_) => (format!("no answer within {timeout:?}"), true),
        };
        self.0.counters.backend_error(operation);
        if down {
            self.down(&why);
        } else {
            tracing::warn!(operation, error = %why, "the limits store refused a call");
        }
        // Sent, and no answer: Redis may run it yet (it was slow, or stopped).
        Err(StoreError { message: why, maybe_ran: down })
    }

    /// [`Self::invoke`] on the control runtime, waited for at most the timeout (and a little).
    async fn call<T: redis::FromRedisValue + Send + 'static>(
        &self,
        operation: &'static str,
        script: &'static redis::Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        let task = self.0.runtime.spawn(async move { store.invoke(operation, script, &keys, &args).await });
        match tokio::time::timeout(self.0.timeout + SLACK, task).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(StoreError::new("the gateway is shutting down")),
            Err(_) => Err(StoreError::new("no answer in time")),
        }
    }

    /// Marks the store down (once) and starts probing it.
    fn down(&self, why: &str) {
        if self.0.up.swap(false, Ordering::AcqRel) {
            tracing::error!(error = %why, "the limits store (Redis) cannot be reached; limits.on_backend_error applies until it is back");
            self.0.counters.backend_up(false);
        }
        if !self.0.probing.swap(true, Ordering::AcqRel) {
            self.0.runtime.spawn(probe(self.clone()));
        }
    }

    /// Checks and reserves `hold` against every limit of its subjects, in one round trip. A store that has lost
    /// this replica's share of the counts is given it from the ledger first (waiting for that at most the backend
    /// timeout).
    pub async fn admit(&self, hold: &Hold, snapshot: &Snapshot) -> Result<Admit, StoreError> {
        let w = &hold.windows;
        let ttl = snapshot.config.limits.reservation_ttl.as_millis().to_string();
        let mut keys = vec![RESERVATIONS.to_owned(), self.0.marker.clone(), reservation(&self.hold_id(hold))];
        let mut args = vec![ttl, u8::from(hold.billed).to_string()];
        let mut which = Vec::new();
        for (index, counted) in hold.subjects.iter().enumerate() {
            for kind in Kind::ALL.into_iter().filter(|k| counted.counts(*k)) {
                let (key, ttl) = counter(&counted.id, kind, w);
                let amount = hold.reserved.of(kind);
                let limit = counted.limits.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n);
                let check = limit.is_some() && (amount > 0 || (hold.billed && kind != Kind::RequestsPerMinute));
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
            let answer = self.admit_once(hold, keys.clone(), args.clone()).await?;
            match answer.as_slice() {
                [0] => return Ok(Admit::Admitted),
                [1, i, used] => {
                    let (index, kind) = usize::try_from(*i)
                        .ok()
                        .and_then(|i| which.get(i).copied())
                        .ok_or_else(|| StoreError::new("the admission script named no counter"))?;
                    return Ok(Admit::Refused { index, kind, used: u64::try_from(*used).unwrap_or(0) });
                }
                [2] if attempt == 0 => {
                    if !self.wait_for_seed(snapshot.ledger.clone()).await {
                        return Ok(Admit::Unseeded);
                    }
                }
                [2] => return Ok(Admit::Unseeded),
                other => return Err(StoreError::new(format!("the admission script answered {other:?}"))),
            }
        }
        Ok(Admit::Unseeded)
    }

    /// One admission. Its answer comes back over a channel: if the request has gone by then (its caller left, or
    /// gave up waiting on a slow Redis), an admission that went through is released at once rather than held
    /// until its expiry.
    async fn admit_once(&self, hold: &Hold, keys: Vec<String>, args: Vec<String>) -> Result<Vec<i64>, StoreError> {
        if !self.is_up() {
            return Err(StoreError::new("the limits store is down"));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (store, hold) = (self.clone(), hold.clone());
        self.0.runtime.spawn(async move {
            let answer = store.invoke::<Vec<i64>>("admit", &SCRIPTS.admit, &keys, &args).await;
            // An admission no one waits for any more, or one that Redis may yet run after the gateway gave up on
            // it (the request went on unreserved, or was refused): released, now or once Redis is back (a
            // release of one that never ran does nothing; the request's own settle still counts its usage).
            let late = matches!(&answer, Err(e) if e.maybe_ran);
            let unclaimed = matches!(tx.send(answer), Err(Ok(answer)) if answer == [0]);
            if late || unclaimed {
                let release = store.unsettled(&hold, Amounts::default(), hold.windows);
                if let Err(release) = store.try_settle(release).await {
                    store.keep(release);
                }
            }
        });
        match tokio::time::timeout(self.0.timeout + SLACK, rx).await {
            Ok(Ok(answer)) => answer,
            _ => Err(StoreError::new("no answer in time")),
        }
    }

    /// Starts the rebuild of this replica's share of the counts from `ledger` (the one in force) unless one is
    /// running.
    fn start_seed(&self, ledger: Option<Ledger>) {
        if !self.0.seeding.swap(true, Ordering::AcqRel) {
            let store = self.clone();
            self.0.runtime.spawn(async move {
                store.seed(ledger).await;
                store.0.seeding.store(false, Ordering::Release);
                store.0.seeded.send_modify(|n| *n += 1);
                store.replay().await;
            });
        }
    }

    /// Starts (or joins) the rebuild, and waits for it at most the backend timeout: whether it finished.
    async fn wait_for_seed(&self, ledger: Option<Ledger>) -> bool {
        let mut seeded = self.0.seeded.subscribe();
        seeded.mark_unchanged();
        self.start_seed(ledger);
        matches!(tokio::time::timeout(self.0.timeout, seeded.changed()).await, Ok(Ok(())))
    }

    /// Adds what this replica's ledger says was used in the open windows by the requests that ended up to now,
    /// unless another rebuild already has; settles of requests that end later count themselves. A request's
    /// ledger line is appended before its settle reads the clock, so every request that ended by now has its line
    /// in the file once the writer has flushed.
    async fn seed(&self, ledger: Option<Ledger>) {
        let now = Windows::now();
        let cutoff = now.now_ms;
        let read = move || {
            let Some(ledger) = ledger else {
                return Ok(super::seed::Seeded { windows: now, subjects: BTreeMap::new(), lines: 0 });
            };
            if !ledger.flush(LEDGER_FLUSH) {
                tracing::warn!(
                    "limits: the ledger writer did not write out its lines in time; the rebuild may miss some"
                );
            }
            super::seed::from_ledger(ledger.path(), now, cutoff)
        };
        let seeded = match tokio::task::spawn_blocking(read).await {
            Ok(Ok(seeded)) => seeded,
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "limits: the ledger could not be read to rebuild the counts; counting from zero");
                super::seed::Seeded { windows: now, subjects: BTreeMap::new(), lines: 0 }
            }
            Err(_) => return,
        };
        let mut keys = vec![self.0.marker.clone()];
        let mut args = vec![cutoff.to_string()];
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
        match self.invoke::<i64>("seed", &SCRIPTS.seed, &keys, &args).await {
            Ok(1) if seeded.lines == 0 => {
                tracing::info!(marker = %self.0.marker, "limits: this replica's counts begin in this store");
            }
            Ok(1) => tracing::warn!(
                marker = %self.0.marker,
                ledger_lines = seeded.lines,
                subjects = seeded.subjects.len(),
                "limits: the store did not hold this replica's counts (a new store, or one flushed or restarted \
                 empty); rebuilt them from its ledger"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "limits: the rebuild of this replica's counts failed; the next request retries it")
            }
        }
    }

    /// Settles `hold` with `used`, counted in the windows of `at` (when its request ended), after the request (a
    /// follow-up); one the store cannot take now is kept and replayed once it can.
    pub fn settle(&self, hold: Hold, used: Amounts, at: Windows) -> Followup {
        let store = self.clone();
        Box::pin(async move {
            let unsettled = store.unsettled(&hold, used, at);
            let task = store.0.runtime.clone().spawn({
                let store = store.clone();
                async move {
                    if let Err(unsettled) = store.try_settle(unsettled).await {
                        store.keep(unsettled);
                    }
                }
            });
            let _ = task.await;
        })
    }

    /// The settle of `hold` with `used`, counted in the windows of `at` (when its request ended), as a call.
    fn unsettled(&self, hold: &Hold, used: Amounts, at: Windows) -> Unsettled {
        let id = &self.hold_id(hold);
        let mut keys =
            vec![RESERVATIONS.to_owned(), reservation(id), tombstone(id), done_marker(id), self.0.marker.clone()];
        let mut args = vec![u8::from(hold.in_store).to_string(), at.now_ms.to_string(), DONE_TTL.as_secs().to_string()];
        for counted in hold.subjects.iter() {
            for kind in Kind::ALL.into_iter().filter(|k| counted.counts(*k) && *k != Kind::RequestsPerMinute) {
                let (key, ttl) = counter(&counted.id, kind, &at);
                keys.push(key);
                args.extend([used.of(kind).to_string(), ttl.to_string()]);
            }
        }
        Unsettled { keys, args, ended_ms: at.now_ms, script: SCRIPTS.settle.get_hash().to_owned(), tries: 0 }
    }

    /// One settle; gives it back if it must be replayed (the store is down, or has lost its counts).
    async fn try_settle(&self, u: Unsettled) -> Result<(), Unsettled> {
        match self.invoke::<i64>("settle", &SCRIPTS.settle, &u.keys, &u.args).await {
            // Replayed after the rebuild (the sweeper or the next request starts it).
            Ok(2) => Err(u),
            Ok(_) => Ok(()),
            Err(_) => Err(u),
        }
    }

    fn keep(&self, unsettled: Unsettled) {
        let mut kept = self.0.unsettled.lock().unwrap_or_else(PoisonError::into_inner);
        if self.0.finished.load(Ordering::Acquire) {
            tracing::warn!("limits: a settle Redis did not take came after shutdown had kept the others; it is lost");
            self.0.counters.settle_dropped();
            return;
        }
        if kept.len() >= REPLAY_MAX {
            kept.pop_front();
            self.0.counters.settle_dropped();
        }
        kept.push_back(unsettled);
    }

    /// Whether settles are kept for replay.
    pub fn has_kept(&self) -> bool {
        !self.0.unsettled.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }

    /// Replays the settles kept, oldest first (unless one is already running, or shutdown has begun). Once none
    /// is left, this process's file of them is gone too.
    async fn replay(&self) {
        let Ok(_replaying) = self.0.replaying.try_lock() else { return };
        if self.0.finishing.load(Ordering::Acquire) {
            return;
        }
        self.replay_kept(None).await;
        if !self.has_kept()
            && let Some(files) = &self.0.kept_files
            && let Err(e) = files.write(&VecDeque::new())
        {
            tracing::warn!(file = %files.own.display(), error = %e, "limits: cannot remove the replayed settles' file");
        }
    }

    /// Replays each settle kept once at most, until Redis is down, shutdown begins (for a replay with no
    /// `deadline`) or `deadline` passes. One Redis answers with an error goes to the back, and is dropped after
    /// [`REPLAY_TRIES`] such answers (a call Redis will never take must not hold up the others for a day).
    async fn replay_kept(&self, deadline: Option<tokio::time::Instant>) {
        let queue = || self.0.unsettled.lock().unwrap_or_else(PoisonError::into_inner);
        let mut left = queue().len();
        while left > 0 {
            let stop = match deadline {
                Some(deadline) => tokio::time::Instant::now() >= deadline,
                None => self.0.finishing.load(Ordering::Acquire),
            };
            if stop {
                return;
            }
            left -= 1;
            let Some(unsettled) = queue().pop_front() else { return };
            if Windows::now().now_ms.saturating_sub(unsettled.ended_ms) > REPLAY_WITHIN.as_millis() as u64 {
                self.0.counters.settle_dropped();
                continue;
            }
            match self.try_settle(unsettled).await {
                Ok(()) => {}
                Err(unsettled) if !self.is_up() => {
                    queue().push_front(unsettled);
                    return;
                }
                Err(mut unsettled) => {
                    unsettled.tries += 1;
                    if unsettled.tries >= REPLAY_TRIES {
                        tracing::warn!(tries = unsettled.tries, "limits: a settle Redis keeps refusing is dropped");
                        self.0.counters.settle_dropped();
                    } else {
                        queue().push_back(unsettled);
                    }
                }
            }
        }
    }

    /// At shutdown, once every request has ended: stops any replay, makes what Redis takes within
    /// [`FINISH_REPLAY`], and writes the rest beside the ledger for the next process (without a ledger, it is
    /// lost, and counted so).
    pub async fn finish(&self) {
        self.0.finishing.store(true, Ordering::Release);
        // A replay in progress stops after its current call (bounded by the backend timeout).
        let _replaying = self.0.replaying.lock().await;
        if self.has_kept() && self.is_up() {
            self.replay_kept(Some(tokio::time::Instant::now() + FINISH_REPLAY)).await;
        }
        let kept = {
            let mut queue = self.0.unsettled.lock().unwrap_or_else(PoisonError::into_inner);
            self.0.finished.store(true, Ordering::Release);
            std::mem::take(&mut *queue)
        };
        if kept.is_empty() {
            if let Some(files) = &self.0.kept_files
                && let Err(e) = files.write(&kept)
            {
                tracing::warn!(file = %files.own.display(), error = %e, "limits: cannot remove the replayed settles' file");
            }
            return;
        }
        let written = match &self.0.kept_files {
            Some(files) => files.write(&kept).map_err(|e| format!("cannot write {}: {e}", files.own.display())),
            None => Err("no ledger to keep them beside".to_owned()),
        };
        match written {
            Ok(()) => {
                tracing::warn!(settles = kept.len(), "limits: settles Redis did not take are kept for the next start")
            }
            Err(why) => {
                tracing::error!(error = %why, settles = kept.len(), "limits: settles Redis did not take are lost; their usage is missing from its counts");
                for _ in &kept {
                    self.0.counters.settle_dropped();
                }
            }
        }
    }

    /// What each of `rules`' limits has used now. With `sweep` (the ledger in force), releases expired reservations
    /// too, and gives a store found to have lost this replica's counts them again, with no request to notice.
    pub async fn read(
        &self,
        rules: &[Arc<Counted>],
        now: Windows,
        sweep: Option<Option<Ledger>>,
    ) -> Result<BTreeMap<(Arc<str>, Kind), u64>, StoreError> {
        let mut keys = vec![RESERVATIONS.to_owned(), self.0.marker.clone()];
        let mut which = Vec::new();
        for rule in rules {
            for (kind, _) in &rule.limits {
                keys.push(counter(&rule.id, *kind, &now).0);
                which.push((rule.id.clone(), *kind));
            }
        }
        let values: Vec<i64> =
            self.call("sweep", &SCRIPTS.sweep, keys, vec![u8::from(sweep.is_some()).to_string()]).await?;
        if let (Some(ledger), Some(0)) = (sweep, values.first()) {
            self.start_seed(ledger);
        } else if self.has_kept() {
            // Redis answers: settles kept from an error answer (a full Redis refusing writes) or by the last
            // process are taken now, not at the next outage's end.
            let store = self.clone();
            self.0.runtime.spawn(async move { store.replay().await });
        }
        Ok(which.into_iter().zip(values.into_iter().skip(2)).map(|(k, v)| (k, u64::try_from(v).unwrap_or(0))).collect())
    }
}

/// How long the done marker of a settle admitted while the store was down is kept: a replay later than this
/// would count twice, and is dropped first ([`REPLAY_WITHIN`]).
const DONE_TTL: Duration = Duration::from_secs(2 * 86_400);

/// Probes the store until it answers (any answer, an error one too: it is there), on a new connection each time,
/// then puts that connection in use, marks the store up and replays the settles kept meanwhile.
async fn probe(store: RedisStore) {
    let inner = &store.0;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    let conn = loop {
        tick.tick().await;
        let Ok(mut conn) = ConnectionManager::new_lazy_with_config(inner.client.clone(), inner.config.clone()) else {
            continue;
        };
        let ping = tokio::time::timeout(inner.timeout, redis::cmd("PING").query_async::<redis::Value>(&mut conn)).await;
        match ping {
            Ok(Ok(_)) => break conn,
            Ok(Err(e))
                if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()) =>
            {
                break conn;
            }
            _ => {}
        }
    };
    *inner.conn.lock().unwrap_or_else(PoisonError::into_inner) = conn;
    inner.up.store(true, Ordering::Release);
    inner.probing.store(false, Ordering::Release);
    inner.counters.backend_up(true);
    tracing::info!("the limits store (Redis) answers again");
    store.replay().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(hold: &str) -> Unsettled {
        Unsettled {
            keys: vec![RESERVATIONS.to_owned(), reservation(hold)],
            args: vec!["1".into(), "1767225600000".into()],
            ended_ms: 1_767_225_600_000,
            script: SCRIPTS.settle.get_hash().to_owned(),
            tries: 0,
        }
    }

    fn line(u: &Unsettled) -> String {
        serde_json::to_string(u).expect("json") + "\n"
    }

    #[test]
    fn a_process_takes_every_file_stopped_ones_left_and_forgets_its_own_once_made() {
        let dir = std::env::temp_dir().join(format!("mantlegate-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let ledger = dir.join("usage.jsonl");
        // Two stopped processes' files, one with a line of another script version and a torn line; a file half
        // written (never renamed) and another ledger's file, neither taken.
        let mut other_version = call("gw:b:3");
        other_version.script = "0".repeat(40);
        std::fs::write(dir.join("usage.jsonl.unsettled.aaa"), line(&call("gw:a:1")) + &line(&call("gw:a:2")))
            .expect("a");
        std::fs::write(dir.join("usage.jsonl.unsettled.bbb"), line(&other_version) + "{\"keys\":[").expect("b");
        std::fs::write(dir.join("usage.jsonl.unsettled.ccc.partial"), line(&call("gw:c:1"))).expect("c");
        std::fs::write(dir.join("other.jsonl.unsettled.ddd"), line(&call("gw:d:1"))).expect("d");
        let counters = LimitCounters::default();
        let files = KeptFiles::new(&ledger);
        let taken = files.take(&counters).expect("taken");
        assert_eq!(
            taken.iter().map(|u| u.keys[1].as_str()).collect::<Vec<_>>(),
            [reservation("gw:a:1"), reservation("gw:a:2")]
        );
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let own = files.own.file_name().expect("name").to_string_lossy().into_owned();
        let mut want = ["other.jsonl.unsettled.ddd", &own, "usage.jsonl.unsettled.ccc.partial"];
        want.sort();
        assert_eq!(left, want);
        // Its own file holds what it took, for a restart before they are made.
        assert_eq!(std::fs::read_to_string(&files.own).expect("own"), line(&taken[0]) + &line(&taken[1]));
        // Made: the file goes.
        files.write(&VecDeque::new()).expect("removed");
        assert!(!files.own.exists());
        let next = KeptFiles::new(&ledger).take(&counters).expect("nothing");
        assert!(next.is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
