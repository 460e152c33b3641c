// The spend page: reads this listener's /api/ (with the admin token, when the listener asks for one) and draws
// it. The token is kept in sessionStorage (gone with the tab) and sent as a header, never in a URL.
"use strict";

const TOKEN = "mantlegate-admin-token";
const SPEND_EVERY_MS = 5000;
const LIVE_EVERY_MS = 2000;
const RATE_WINDOW_MS = 30000;
const SVG = "http://www.w3.org/2000/svg";

const page = { group: "project", status: null, samples: [] };
const $ = (id) => document.getElementById(id);

class NeedToken extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN);
  const res = await fetch(path, { headers: token ? { Authorization: `Bearer ${token}` } : {}, cache: "no-store" });
  if (res.status === 401) throw new NeedToken(token ? "That token was refused." : "");
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || `${path}: ${res.status}`);
  }
  return res;
}

const json = async (path) => (await api(path)).json();

// Numbers as `mantlegate usage report` prints them: costs to four decimals, or two significant digits past the
// zeros of a smaller amount (so small spend never reads as zero); counts with thousands separators.
function usd(x) {
  let text;
  if (x === 0 || Math.abs(x) >= 0.01) {
    text = x.toFixed(4);
  } else {
    const decimals = Math.min(12, Math.max(4, 2 - Math.floor(Math.log10(Math.abs(x)))));
    text = x.toFixed(decimals).replace(/0+$/, "");
  }
  const [whole, fraction] = text.split(".");
  return `$${Number(whole).toLocaleString("en-US")}.${fraction}`;
}
const count = (n) => n.toLocaleString("en-US");

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.textContent = text;
  return node;
}

const COLUMNS = [
  ["requests", "Requests", count],
  ["input_tokens", "Input tokens", count],
  ["output_tokens", "Output tokens", count],
  ["cached_input_tokens", "Cached", count],
  ["reasoning_tokens", "Reasoning", count],
  ["cost_usd", "Cost (USD)", usd],
];

function groupTitle(group) {
  return group.startsWith("tag:") ? group.slice(4) : group[0].toUpperCase() + group.slice(1);
}

function drawTable(table, spend) {
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", {}, groupTitle(spend.group_by)), ...COLUMNS.map(([, title]) => el("th", {}, title)));
  table.append(el("thead"));
  table.tHead.append(head);
  const body = el("tbody");
  for (const row of spend.rows) {
    const tr = el("tr", { "data-group": row.group });
    tr.append(el("td", { "data-col": "group" }, row.group));
    for (const [key, , format] of COLUMNS) tr.append(el("td", { "data-col": key }, format(row[key])));
    body.append(tr);
  }
  if (spend.rows.length === 0) {
    const none = el("tr");
    none.append(el("td", { class: "empty", colspan: 7 }, "No spend."));
    body.append(none);
  }
  table.append(body);
  const total = el("tr", { "data-group": "(total)" });
  total.append(el("td", { "data-col": "group" }, "Total"));
  for (const [key, , format] of COLUMNS) total.append(el("td", { "data-col": key }, format(spend.totals[key])));
  table.append(el("tfoot"));
  table.tFoot.append(total);
}

function tokens(t) {
  return `${count(t.requests)} requests · ${count(t.input_tokens)} in / ${count(t.output_tokens)} out tokens`;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// One bar a day, scaled to the month's dearest day; today's in another colour, days still to come faint.
function drawChart(daily, today) {
  const chart = $("chart");
  const [width, height, top, bottom, left] = [900, 180, 16, 22, 64];
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  chart.replaceChildren();
  const max = Math.max(...daily.days.map((d) => d.cost_usd), 0);
  const slot = (width - left) / daily.days.length;
  const scale = max > 0 ? (height - top - bottom) / max : 0;
  chart.append(svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom }));
  chart.append(svg("text", { x: 0, y: top }, usd(max)));
  chart.append(svg("text", { x: 0, y: height - bottom }, usd(0)));
  daily.days.forEach((d, i) => {
    const h = Math.max(d.cost_usd * scale, d.cost_usd > 0 ? 1 : 0);
    const x = left + i * slot;
    const kind = d.day === today ? "today" : d.day > today ? "future" : "past";
    const bar = svg("rect", { x: x + 1, y: height - bottom - h, width: Math.max(slot - 2, 1), height: h, class: kind });
    bar.setAttribute("data-day", d.day);
    bar.setAttribute("data-cost", d.cost_usd);
    bar.append(svg("title", {}, `${d.day}: ${usd(d.cost_usd)}, ${count(d.requests)} requests`));
    chart.append(bar);
    const dayOfMonth = Number(d.day.slice(8));
    if (dayOfMonth === 1 || dayOfMonth % 5 === 0) {
      chart.append(svg("text", { x: x + slot / 2, y: height - 6, "text-anchor": "middle" }, String(dayOfMonth)));
    }
  });
}

function drawGroups(status) {
  const nav = $("groups");
  const groups = [["project", "Project"], ...status.tags.map((t) => [`tag:${t}`, t]), ["model", "Model"], ["key", "Key"]];
  nav.replaceChildren(el("span", {}, "Group by:"));
  for (const [value, title] of groups) {
    const button = el("button", { type: "button", "data-group": value, "aria-pressed": value === page.group }, title);
    button.addEventListener("click", () => {
      page.group = value;
      refresh();
    });
    nav.append(button);
  }
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("token").focus();
}

let spendTimer;
async function refresh() {
  clearTimeout(spendTimer);
  try {
    const status = await json("/api/status");
    page.status = status;
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = !sessionStorage.getItem(TOKEN);
    $("replica").textContent = `· replica ${status.replica}`;
    $("asof").textContent = `as of ${status.now.replace("T", " ").replace("Z", " UTC")}`;
    $("footnote").textContent =
      `This page shows replica ${status.replica}'s own ledger (${status.ledger || "none"}); each replica of a ` +
      `gateway serves its own. Spend at the configured prices. Unattributed requests are counted since this ` +
      `replica started (${status.started}).` +
      (status.reroute_to ? ` Rerouted requests are billed to project ${status.reroute_to}.` : "");
    if (!page.status.tags.includes(page.group.slice(4)) && page.group.startsWith("tag:")) page.group = "project";
    drawGroups(status);
    const index = status.index;
    if (index.state !== "ready") {
      const said = {
        no_ledger: status.ledger_in_force
          ? `The ledger ${status.ledger_in_force} was configured after this replica started: restart it to see spend.`
          : "No usage ledger is configured ([metering] ledger_path): there is no spend to show.",
        reading: `Reading the ledger: ${count(index.lines || 0)} lines so far.`,
        failed: `The ledger could not be read: ${index.error}`,
      };
      notice(said[index.state]);
      return;
    }
    notice(status.ledger !== status.ledger_in_force
      ? `The ledger in force is ${status.ledger_in_force}; this page follows ${status.ledger} until a restart.` : "");
    const group = `group_by=${encodeURIComponent(page.group)}`;
    const [today, month, daily] = await Promise.all([
      json(`/api/spend?${group}&since=${encodeURIComponent(status.today)}`),
      json(`/api/spend?${group}&since=${encodeURIComponent(status.month)}`),
      json("/api/spend/daily"),
    ]);
    drawTable($("today"), today);
    drawTable($("month"), month);
    $("today-cost").textContent = usd(today.totals.cost_usd);
    $("today-detail").textContent = tokens(today.totals);
    $("month-cost").textContent = usd(month.totals.cost_usd);
    $("month-detail").textContent = tokens(month.totals);
    $("chart-month").textContent = status.month.slice(0, 7);
    drawChart(daily, status.today.slice(0, 10));
  } catch (e) {
    if (e instanceof NeedToken) return showLogin(e.message);
    notice(e.message);
  } finally {
    if ($("login").hidden) spendTimer = setTimeout(refresh, SPEND_EVERY_MS);
  }
}

// Rates over the last half minute of samples of the counters since the start.
async function pollLive() {
  try {
    if (!$("main").hidden) {
      const live = await json("/api/live");
      const now = { t: live.now_ms, ...live.answered };
      page.samples = page.samples.filter((s) => now.t - s.t <= RATE_WINDOW_MS && s.t < now.t).concat([now]);
      const first = page.samples[0];
      const seconds = (now.t - first.t) / 1000;
      const requests = now.requests - first.requests;
      if (seconds > 0) {
        $("rate").textContent = `${(requests / seconds).toFixed(1)} req/s`;
        const share = (n) => (requests > 0 ? ((100 * n) / requests).toFixed(1) : "0.0");
        $("errors").textContent =
          `${share(now.server_errors - first.server_errors)} % errors (5xx) · ` +
          `${share(now.client_errors - first.client_errors)} % refused (4xx), last ${Math.round(seconds)} s`;
      }
      const u = live.unattributed;
      $("unattributed").textContent = count(u.today.rejected + u.today.rerouted);
      $("unattributed-detail").textContent =
        `${count(u.today.rejected)} refused (project_required) · ${count(u.today.rerouted)} rerouted; since start: ` +
        `${count(u.since_start.rejected)} refused · ${count(u.since_start.rerouted)} rerouted`;
    }
  } catch (e) {
    if (e instanceof NeedToken) showLogin(e.message);
  } finally {
    setTimeout(pollLive, LIVE_EVERY_MS);
  }
}

async function downloadCsv() {
  const status = page.status;
  const query = `group_by=${encodeURIComponent(page.group)}&since=${encodeURIComponent(status.month)}`;
  const blob = await (await api(`/api/spend.csv?${query}`)).blob();
  const link = el("a", { href: URL.createObjectURL(blob), download: `spend-${page.group}-${status.month.slice(0, 7)}.csv` });
  link.click();
  // Once the download has taken it.
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN, $("token").value.trim());
  $("token").value = "";
  refresh();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN);
  showLogin("");
});
$("csv").addEventListener("click", () => downloadCsv().catch((e) => notice(e.message)));
refresh();
pollLive();
