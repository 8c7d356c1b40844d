/*
 * Twiscope live dashboard (vanilla ES2020, no build step).
 *
 * Reads (and, from the Sources panel, a team owner's writes):
 *   GET /api/stats/                                   every 2 s  -> rate chart + tiles
 *   GET /api/trends/?current=true&ordering=-score     every 5 s  -> trends table
 *   GET /api/trends/<id>/events/                      on click   -> posts behind a trend
 *   GET /api/streams/?page_size=100                   every 3 s  -> streams' event-time clocks
 *   GET /api/sentiment/                               every 10 s -> sentiment over time
 *   GET /api/series/?source&kind[&term|&watch]        every 30 s -> the chosen anomaly series
 *   GET /api/anomalies/?page_size=20                  every 30 s -> recent anomalies
 *   GET /api/sources/                                 every 5 s  -> sources' health
 *   POST /api/sources/, PATCH /api/sources/<id>/      on submit / click (owners)
 *   GET /api/alerts/                                  snapshot (newest page) on load
 *   GET /api/alerts/?team&after_seq&ordering=seq      catch-up, page after page (`next`)
 *   WS  /ws/alerts/   {"type": "hello", "v": 1, "teams": {"<team>": <last seq>}}
 *                     {"type": "alert.created", "v": 1, "team", "seq", "alert": {...}}
 *                     {"type": "alert.updated", ...}: a story's alert grew, same seq
 *                     close 4503: the server's database or Redis is down, retry;
 *                     4401 / 4403: not signed in / origin refused
 *
 * The channel layer is at most once, so the feed is a REST snapshot plus pushed alerts,
 * and the client keeps, per team, the seq up to which it holds every alert (`heldSeq`).
 * A hello after a reconnect whose seq is past it, or a pushed seq past it + 1 (a gap),
 * starts a catch-up: GET ?team=<t>&after_seq=<held>&ordering=seq, following `next`
 * until it is null, so every missed alert arrives, oldest first, however many. Alerts
 * are de-duplicated by id, and a pushed seq ≤ held is a duplicate (the server joins
 * the groups before it reads the seqs for hello, so an alert may come both ways).
 * While the socket is down the header says "reconnecting" and it retries with backoff.
 *
 * User content (post text, handles, terms, titles) is only ever written with
 * textContent / text nodes, never parsed as HTML.
 */
(() => {
  'use strict';

  const root = document.getElementById('dashboard');
  if (!root) return;

  const $ = (id) => document.getElementById(id);
  const STREAMS_PAGE = 100;

  const API = {
    stats: '/api/stats/',
    trends: '/api/trends/?current=true&ordering=-score',
    events: (trendId) => `/api/trends/${encodeURIComponent(trendId)}/events/`,
    alerts: '/api/alerts/',
    streams: `${$('streams')?.dataset.api || '/api/streams/'}?page_size=${STREAMS_PAGE}`,
    sentiment: '/api/sentiment/',
    series: '/api/series/',
    anomalies: '/api/anomalies/?page_size=20',
    sources: $('sources')?.dataset.api || '/api/sources/',
  };
  const WS_PATH = '/ws/alerts/';
  const STATS_EVERY_MS = 2000;
  const TRENDS_EVERY_MS = 5000;
  const STREAMS_EVERY_MS = 3000;
  const SENTIMENT_EVERY_MS = 10000;
  const ANOMALIES_EVERY_MS = 30000;
  const SOURCES_EVERY_MS = 5000;
  const SENTIMENT_COLOURS = { negative: '#c0392b', neutral: '#9aa3b0', positive: '#2e8b57' };
  const RATE_WINDOW_MS = 5 * 60 * 1000;
  const MAX_ALERTS = 200;
  const CATCH_UP_PAGE = 100; // alerts per catch-up request (the API takes 1 to 500)
  const CLOSE_UNAVAILABLE = 4503; // the server's database or Redis is down: retry
  const CLOSE_UNAUTHENTICATED = 4401;
  const CLOSE_ORIGIN_REFUSED = 4403;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const HIGHLIGHT_MS = 4000;
  const SEVERITIES = new Set(['info', 'warning', 'critical']);
  const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS', 'TRACE']);

  // ---------------------------------------------------------------- helpers

  /** Build an element. Strings among children become text nodes (never HTML). */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key === 'dataset') Object.assign(el.dataset, value);
      else if (key.startsWith('on') && typeof value === 'function') {
        el.addEventListener(key.slice(2), value);
      } else el.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function setText(id, value) {
    const el = $(id);
    if (el) el.textContent = value;
  }

  function cookie(name) {
    for (const part of document.cookie.split(';')) {
      const [k, ...v] = part.trim().split('=');
      if (k === name) return decodeURIComponent(v.join('='));
    }
    return '';
  }

  const nf0 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const nf1 = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  const nf2 = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });

  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const fmtInt = (v) => (isNum(v) ? nf0.format(v) : '—');
  const fmt1 = (v) => (isNum(v) ? nf1.format(v) : '—');
  const fmt2 = (v) => (isNum(v) ? nf2.format(v) : '—');

  /** ISO 8601 -> epoch ms; tolerates microseconds, which Date.parse need not. */
  function parseTime(iso) {
    if (typeof iso !== 'string' || iso === '') return NaN;
    return Date.parse(iso.replace(/(\.\d{3})\d+/, '$1'));
  }

  const utcTime = new Intl.DateTimeFormat(undefined, {
    hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false, timeZone: 'UTC',
  });
  const utcDateTime = new Intl.DateTimeFormat(undefined, {
    month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', hour12: false,
    timeZone: 'UTC',
  });

  /** Short UTC label: time of day when today (UTC), else date and minute. */
  function fmtWhen(iso) {
    const t = parseTime(iso);
    if (!Number.isFinite(t)) return '—';
    const sameDay = new Date(t).toISOString().slice(0, 10) === new Date().toISOString().slice(0, 10);
    return sameDay ? utcTime.format(t) : utcDateTime.format(t);
  }

  function timeEl(iso, cls) {
    const t = parseTime(iso);
    return h('time', {
      class: cls,
      datetime: Number.isFinite(t) ? new Date(t).toISOString() : null,
      title: Number.isFinite(t) ? new Date(t).toISOString().replace('T', ' ').replace('Z', ' UTC') : null,
    }, fmtWhen(iso));
  }

  /** Full UTC date-time, "2015-02-20 14:30:00": an event-time clock needs its date. */
  function fmtUtcDateTime(iso) {
    const t = parseTime(iso);
    if (!Number.isFinite(t)) return null;
    return new Date(t).toISOString().slice(0, 19).replace('T', ' ');
  }

  /** "12 s ago", "3 min ago", "2 h ago" (processing time, from this browser's clock). */
  function fmtAgo(iso) {
    const t = parseTime(iso);
    if (!Number.isFinite(t)) return '—';
    const s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function fmtDuration(seconds) {
    if (!isNum(seconds)) return '';
    if (seconds % 3600 === 0) return `${seconds / 3600} h`;
    if (seconds % 60 === 0) return `${seconds / 60} min`;
    return `${seconds} s`;
  }

  // ------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message, data = null) {
      super(message);
      this.status = status;
      this.data = data; // the JSON body of a refusal (DRF's field errors), if any
    }
  }

  /** fetch() JSON from our own API with the session cookie. */
  async function api(url, { method = 'GET', body } = {}) {
    const headers = { Accept: 'application/json' };
    if (!SAFE_METHODS.has(method)) {
      headers['X-CSRFToken'] = cookie('csrftoken');
      if (body !== undefined) headers['Content-Type'] = 'application/json';
    }
    let res;
    try {
      res = await fetch(url, {
        method,
        headers,
        credentials: 'same-origin',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, 'cannot reach the server');
    }
    if (!res.ok) {
      let detail = '';
      let data = null;
      try {
        data = await res.json();
        if (data && typeof data.detail === 'string') detail = data.detail;
      } catch (err) {
        // Not JSON (a proxy's error page): the status line says enough.
      }
      throw new ApiError(res.status, detail || `${res.status} ${res.statusText}`.trim(), data);
    }
    return res.json();
  }

  /** Same-origin path+query of a pagination link, or null for anything else. */
  function sameOriginPath(link) {
    if (!link) return null;
    try {
      const u = new URL(link, window.location.href);
      return u.origin === window.location.origin ? u.pathname + u.search : null;
    } catch (err) {
      return null;
    }
  }

  const isAuthError = (err) => err instanceof ApiError && (err.status === 401 || err.status === 403);

  /** Show (or clear, with err = null) a section's error line; auth errors also raise the banner. */
  function showError(id, what, err, retry) {
    const el = $(id);
    if (!el) return;
    if (!err) {
      el.hidden = true;
      el.textContent = '';
      return;
    }
    el.hidden = false;
    el.replaceChildren();
    if (isAuthError(err)) {
      $('auth-notice').hidden = false;
      el.append(`Not authorised to load ${what}. `,
        h('a', { href: root.dataset.loginUrl || '/accounts/login/' }, 'Log in again'), '.');
      return;
    }
    el.append(`Couldn't load ${what}: ${err.message}.${retry ? ` ${retry}` : ''}`);
  }

  function markUpdated(id) {
    setText(id, `updated ${utcTime.format(Date.now())} UTC`);
  }

  /** Run fn now and again `every` ms after each run finishes (no overlapping requests). */
  function poll(fn, every) {
    const tick = async () => {
      try {
        await fn();
      } finally {
        window.setTimeout(tick, every);
      }
    };
    tick();
  }

  // ------------------------------------------------- events per second + tiles

  const samples = [];
  let chart = null;

  function makeChart() {
    const canvas = $('rate-chart');
    const unavailable = (why) => {
      canvas?.replaceWith(h('p', { class: 'empty' }, `The rate chart is unavailable: ${why}. The tiles still update.`));
      return null;
    };
    if (!canvas) return null;
    if (typeof window.Chart !== 'function') return unavailable('chart.umd.min.js did not load');
    const made = new window.Chart(canvas, {
      type: 'line',
      data: {
        datasets: [{
          label: 'events / s',
          data: samples,
          borderColor: '#2456c7',
          backgroundColor: 'rgba(36, 86, 199, 0.12)',
          borderWidth: 2,
          fill: true,
          pointRadius: 0,
          tension: 0.25,
        }],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        parsing: false,
        normalized: true,
        interaction: { mode: 'nearest', axis: 'x', intersect: false },
        scales: {
          x: {
            type: 'linear',
            ticks: {
              maxTicksLimit: 6,
              callback: (value) => utcTime.format(value),
              color: '#5b6472',
            },
            grid: { color: '#eef0f4' },
          },
          y: {
            beginAtZero: true,
            ticks: { color: '#5b6472', precision: 0 },
            grid: { color: '#eef0f4' },
          },
        },
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              title: (items) => (items.length ? `${utcTime.format(items[0].parsed.x)} UTC` : ''),
              label: (item) => `${fmt1(item.parsed.y)} events/s`,
            },
          },
        },
      },
    });
    // Chart.js logs and leaves ctx null when the canvas gives no 2D context.
    if (!made.ctx) return unavailable('this browser gave no canvas to draw on');
    return made;
  }

  /** The queues of GET /api/stats/, in flow order as the server defines them. */
  function renderQueueLag(queues) {
    const list = $('tile-queue-lag');
    if (!Array.isArray(queues) || !queues.length) {
      list.replaceChildren(h('li', { class: 'muted' }, '—'));
      return;
    }
    list.replaceChildren(...queues.map((q) => h('li', {
      class: isNum(q.waiting) && q.waiting > 0 ? 'lag lag-busy' : 'lag',
      title: q.work,
    }, h('span', { class: 'lag-name' }, q.name), h('span', { class: 'lag-n' }, fmtInt(q.waiting)))));
  }

  function renderStats(s) {
    const now = Date.now();
    const rate = isNum(s.events_per_s) ? s.events_per_s : 0;
    samples.push({ x: now, y: rate });
    while (samples.length && samples[0].x < now - RATE_WINDOW_MS) samples.shift();
    if (chart) {
      chart.options.scales.x.min = now - RATE_WINDOW_MS;
      chart.options.scales.x.max = now;
      chart.update('none');
    }

    setText('tile-events-total', fmtInt(s.events_total));
    setText('tile-events-per-s', fmt1(s.events_per_s));
    const lat = s.alert_latency_ms || {};
    setText('tile-latency-p50', fmtInt(lat.p50));
    setText('tile-latency-p95', fmtInt(lat.p95));
    setText('tile-latency-n', isNum(lat.n) && lat.n > 0
      ? `over ${fmtInt(lat.n)} alerts${isNum(lat.p99) ? ` · p99 ${fmtInt(lat.p99)} ms` : ''}`
      : 'no alerts measured yet');
    renderQueueLag(s.queues);
    renderScoring(s.scoring);
    setText('tile-dead-letters', fmtInt(s.dead_letters_total));
    const dead = $('tile-dead-letters');
    dead.classList.toggle('warn', isNum(s.dead_letters_total) && s.dead_letters_total > 0);

    $('rate-empty').hidden = !(s.events_total === 0);
  }

  function renderScoring(sc) {
    if (!sc) return;
    const heads = Object.entries(sc.active_heads || {});
    setText('tile-scored-share', isNum(sc.transformer_share)
      ? `${fmtInt(sc.transformer_share * 100)}% by the heads`
      : (heads.length ? 'no events this minute' : 'no trained head'));
    setText('tile-scoring-lag', fmt1(sc.lag_s));
    setText('tile-scoring-note', heads.length
      ? `${heads.map(([task, name]) => `${task}: ${name}`).join(' · ')} · past ${fmtInt(sc.fallback_after_s)} s an event keeps VADER's label${sc.fell_back_1m ? ` (${fmtInt(sc.fell_back_1m)} this minute)` : ''}`
      : 'every label is VADER\'s: run manage.py train to add the transformer heads');
    $('tile-scoring-lag').classList.toggle('warn', isNum(sc.lag_s) && sc.lag_s > sc.fallback_after_s / 2);
  }

  async function refreshStats() {
    try {
      renderStats(await api(API.stats));
      showError('stats-error', null, null);
      markUpdated('stats-updated');
    } catch (err) {
      showError('stats-error', 'pipeline statistics', err, 'Retrying every 2 s.');
    }
  }

  // ------------------------------------------------------ sentiment over time

  let sentimentChart = null;

  function makeSentimentChart() {
    const canvas = $('sentiment-chart');
    if (!canvas) return null;
    if (typeof window.Chart !== 'function') {
      canvas.replaceWith(h('p', { class: 'empty' }, 'The sentiment chart is unavailable: chart.umd.min.js did not load.'));
      return null;
    }
    const made = new window.Chart(canvas, {
      type: 'bar',
      data: {
        labels: [],
        datasets: Object.entries(SENTIMENT_COLOURS).map(([label, colour]) => ({
          label, data: [], backgroundColor: colour, borderWidth: 0, transitions: {},
        })),
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: 'index', intersect: false },
        scales: {
          x: { stacked: true, ticks: { maxTicksLimit: 8, color: '#5b6472' }, grid: { display: false } },
          y: { stacked: true, beginAtZero: true, ticks: { precision: 0, color: '#5b6472' }, grid: { color: '#eef0f4' } },
        },
        plugins: {
          legend: { position: 'bottom' },
          tooltip: { callbacks: { footer: (items) => sentimentFooter(items) } },
        },
      },
    });
    if (!made.ctx) return null;
    return made;
  }

  let sentimentBuckets = [];

  function sentimentFooter(items) {
    const b = items.length ? sentimentBuckets[items[0].dataIndex] : null;
    if (!b) return '';
    const total = b.negative + b.neutral + b.positive;
    return total ? `${fmtInt(b.by_transformer)} of ${fmtInt(total)} labelled by the transformer heads` : '';
  }

  function bucketLabel(iso, bucketS) {
    const ms = parseTime(iso);
    if (!isNum(ms)) return '';
    const text = new Date(ms).toISOString();
    return bucketS >= 86400 ? text.slice(0, 10) : `${text.slice(5, 10)} ${text.slice(11, 16)}`;
  }

  function renderSentiment(series) {
    sentimentBuckets = Array.isArray(series.buckets) ? series.buckets : [];
    const total = sentimentBuckets.reduce((n, b) => n + b.negative + b.neutral + b.positive, 0);
    const scored = sentimentBuckets.reduce((n, b) => n + b.by_transformer, 0);
    $('sentiment-empty').hidden = total > 0;
    const by = scored === total
      ? `All ${fmtInt(total)} posts labelled by the transformer heads.`
      : `${fmtInt(scored)} of ${fmtInt(total)} posts labelled by the transformer heads, the rest by VADER.`;
    setText('sentiment-models', total ? `${by} Buckets of ${fmtDuration(series.bucket_s)}.` : '');
    if (!sentimentChart) return;
    sentimentChart.data.labels = sentimentBuckets.map((b) => bucketLabel(b.start, series.bucket_s));
    for (const dataset of sentimentChart.data.datasets) {
      dataset.data = sentimentBuckets.map((b) => b[dataset.label] || 0);
    }
    sentimentChart.update('none');
  }

  async function refreshSentiment() {
    try {
      renderSentiment(await api(API.sentiment));
      showError('sentiment-error', null, null);
      markUpdated('sentiment-updated');
    } catch (err) {
      showError('sentiment-error', 'the sentiment series', err, 'Retrying every 10 s.');
    }
  }

  // ------------------------------------------------------------ anomalies

  let anomalyChart = null;
  let anomalyWindows = [];

  /** Shades each anomaly window (indices into the labels) behind the lines. */
  const windowShading = {
    id: 'anomalyWindows',
    beforeDatasetsDraw(c) {
      const x = c.scales.x;
      const area = c.chartArea;
      if (!x || !area) return;
      c.ctx.save();
      c.ctx.fillStyle = 'rgba(192, 57, 43, 0.15)';
      for (const w of anomalyWindows) {
        const left = x.getPixelForValue(w.from) - 2;
        const right = x.getPixelForValue(w.to) + 2;
        c.ctx.fillRect(left, area.top, Math.max(4, right - left), area.bottom - area.top);
      }
      c.ctx.restore();
    },
  };

  function makeAnomalyChart() {
    const canvas = $('anomaly-chart');
    if (!canvas) return null;
    if (typeof window.Chart !== 'function') {
      canvas.replaceWith(h('p', { class: 'empty' }, 'The anomaly chart is unavailable: chart.umd.min.js did not load.'));
      return null;
    }
    const line = (label, colour, extra) => ({
      label, data: [], borderColor: colour, backgroundColor: colour, pointRadius: 0,
      borderWidth: 1, spanGaps: false, transitions: {}, ...extra,
    });
    const made = new window.Chart(canvas, {
      type: 'line',
      data: {
        labels: [],
        datasets: [
          line('low', 'rgba(46, 139, 87, 0.35)', {}),
          line('high', 'rgba(46, 139, 87, 0.35)', { fill: '-1', backgroundColor: 'rgba(46, 139, 87, 0.15)' }),
          line('expected', '#2e8b57', { borderDash: [4, 3] }),
          line('value', '#1f4e8c', { borderWidth: 2 }),
        ],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: 'index', intersect: false },
        scales: {
          x: { ticks: { maxTicksLimit: 8, color: '#5b6472' }, grid: { display: false } },
          y: { beginAtZero: true, ticks: { color: '#5b6472' }, grid: { color: '#eef0f4' } },
        },
        plugins: { legend: { position: 'bottom' } },
      },
      plugins: [windowShading],
    });
    if (!made.ctx) return null;
    return made;
  }

  let seriesWindow = null; // {since, until} around a chosen anomaly; null: the last day

  function seriesQuery() {
    const params = new URLSearchParams({ source: $('series-source').value, kind: $('series-kind').value });
    if (params.get('kind') === 'term') params.set('term', $('series-term').value);
    if (params.get('kind') === 'watch') params.set('watch', $('series-watch').value);
    if (seriesWindow) {
      params.set('since', seriesWindow.since);
      params.set('until', seriesWindow.until);
    }
    return `${API.series}?${params}`;
  }

  function fillSelect(select, options) {
    const keep = select.value;
    select.replaceChildren(...options.map(([value, text]) => h('option', { value }, text)));
    if (options.some(([value]) => value === keep)) select.value = keep;
  }

  function renderSeries(series) {
    const points = Array.isArray(series.points) ? series.points : [];
    fillSelect($('series-term'), (series.terms || []).map((t) => [t.term, t.active ? t.term : `${t.term} (retired)`]));
    fillSelect($('series-watch'), (series.watches || []).map((w) => [String(w.id), `watch: ${w.name}${w.active ? '' : ' (retired)'}`]));
    $('anomalies-empty').hidden = points.length > 0;
    if (!anomalyChart) return;
    const starts = points.map((p) => parseTime(p.start));
    const index = (iso) => {
      const ms = parseTime(iso);
      const i = starts.findIndex((s) => s >= ms);
      return i < 0 ? starts.length - 1 : i;
    };
    anomalyWindows = (series.anomalies || []).map((a) => ({
      from: index(a.window_start), to: Math.max(index(a.window_start), index(a.window_end) - 1),
    }));
    anomalyChart.data.labels = points.map((p) => bucketLabel(p.start, series.bucket_s));
    for (const dataset of anomalyChart.data.datasets) {
      dataset.data = points.map((p) => (isNum(p[dataset.label]) ? p[dataset.label] : null));
    }
    anomalyChart.update('none');
  }

  let seriesChosen = false; // the analyst picked a series: stop following the newest anomaly

  /** Show ``a``'s series in the chart (its source, kind and term), 12 h either side of
   * its window's start. */
  function chooseSeries(a) {
    const start = parseTime(a.window_start);
    seriesWindow = Number.isFinite(start)
      ? {
        since: new Date(start - 12 * 3600e3).toISOString(),
        until: new Date(start + 12 * 3600e3).toISOString(),
      }
      : null;
    $('series-source').value = String(a.source.id);
    $('series-kind').value = a.kind;
    if (a.kind === 'term') {
      const select = $('series-term');
      if (![...select.options].some((o) => o.value === a.term)) select.append(h('option', { value: a.term }, a.term));
      select.value = a.term;
    }
    if (a.kind === 'watch' && a.watch) {
      const select = $('series-watch');
      const id = String(a.watch.id);
      if (![...select.options].some((o) => o.value === id)) select.append(h('option', { value: id }, `watch: ${a.watch.name}`));
      select.value = id;
    }
  }

  function anomalyRow(a) {
    const what = a.kind === 'term' ? `${a.term} volume`
      : a.kind === 'watch' ? `watch ${a.watch ? a.watch.name : ''} volume`
        : a.kind === 'negative_share' ? 'negative share' : 'post volume';
    const fmt = (v) => (isNum(v) ? (a.kind === 'negative_share' ? `${Math.round(v * 100)}%` : String(Math.round(v * 10) / 10)) : '—');
    const show = () => {
      seriesChosen = true;
      chooseSeries(a);
      refreshAnomalies();
    };
    return h('li', {
      class: 'clickable',
      tabindex: 0,
      title: 'Show this series',
      onclick: show,
      onkeydown: (ev) => {
        if (ev.key === 'Enter' || ev.key === ' ') {
          ev.preventDefault();
          show();
        }
      },
    },
      timeEl(a.window_start, 'when'), ' ',
      h('strong', {}, `${what} in ${a.source.name}`), ': ',
      `${fmt(a.value)} (expected ${fmt(a.low)}–${fmt(a.high)}), score ${isNum(a.score) ? a.score.toFixed(1) : '—'}`,
      a.closed ? '' : ' · open');
  }

  async function refreshAnomalies() {
    try {
      if (!$('series-source').options.length) {
        const sources = await api(API.sources);
        const rows = Array.isArray(sources) ? sources : sources.results || [];
        fillSelect($('series-source'), rows.map((src) => [String(src.id), src.name]));
      }
      const list = await api(API.anomalies);
      const items = list.results || [];
      if (!seriesChosen && items.length) chooseSeries(items[0]); // the newest anomaly's series
      $('anomaly-list').replaceChildren(...(items.length
        ? items.map(anomalyRow)
        : [h('li', { class: 'empty' }, 'No anomalies yet: they appear here when a series rises above its band.')]));
      const kind = $('series-kind').value;
      const pick = kind === 'term' ? $('series-term') : kind === 'watch' ? $('series-watch') : null;
      $('series-term-label').hidden = kind !== 'term';
      $('series-watch-label').hidden = kind !== 'watch';
      if (!$('series-source').value || (pick && !pick.value)) {
        $('anomalies-empty').hidden = false;
        if (pick && $('series-source').value) { // the volume series lists the terms and watches
          renderSeries(await api(`${API.series}?source=${encodeURIComponent($('series-source').value)}&kind=volume`)
            .catch(() => ({ points: [], terms: [], watches: [] })));
        }
      } else {
        try {
          renderSeries(await api(seriesQuery()));
        } catch (err) {
          if (err.status !== 404) throw err;
          renderSeries({ points: [], anomalies: [], terms: [], watches: [] });
        }
      }
      showError('anomalies-error', null, null);
      markUpdated('anomalies-updated');
    } catch (err) {
      showError('anomalies-error', 'the anomalies', err, 'Retrying every 30 s.');
    }
  }

  // --------------------------------------------------------------- trends

  let selectedTrendId = null;

  function selectRow(id) {
    for (const tr of $('trends-body').children) {
      tr.setAttribute('aria-selected', String(tr.dataset.id === String(id)));
    }
  }

  function trendRow(t) {
    const open = () => showPosts({ id: t.id, term: t.term, source: t.source?.name });
    return h('tr', {
      tabindex: 0,
      dataset: { id: String(t.id) },
      'aria-selected': String(String(t.id) === String(selectedTrendId)),
      onclick: open,
      onkeydown: (ev) => {
        if (ev.key === 'Enter' || ev.key === ' ') {
          ev.preventDefault();
          open();
        }
      },
    },
    h('td', { class: 'term' }, t.term ?? ''),
    h('td', { class: 'source' }, t.source?.name ?? '—'),
    h('td', null, timeEl(t.bucket_start), t.bucket_s ? h('small', { class: 'muted' }, ` · ${fmtDuration(t.bucket_s)}`) : null),
    h('td', { class: 'num' }, fmtInt(t.events)),
    h('td', { class: 'num' }, fmt1(t.expected)),
    h('td', { class: 'num score' }, fmt2(t.score)),
    h('td', { class: 'num' }, fmtInt(t.authors_count)),
    h('td', { class: 'num' }, fmt2(t.velocity)));
  }

  async function refreshTrends() {
    try {
      const page = await api(API.trends);
      const rows = Array.isArray(page.results) ? page.results : [];
      $('trends-body').replaceChildren(...rows.map(trendRow));
      $('trends-empty').hidden = rows.length > 0;
      showError('trends-error', null, null);
      markUpdated('trends-updated');
    } catch (err) {
      showError('trends-error', 'trends', err, 'Retrying every 5 s.');
    }
  }

  // ------------------------------------------------- streams' event-time clocks

  function streamRow(c) {
    const src = c.source || {};
    const clock = fmtUtcDateTime(c.watermark);
    const late = isNum(c.late_events) && c.late_events > 0;
    return h('tr', { dataset: { source: String(src.id ?? '') } },
      h('td', { class: 'source' }, src.name ?? '—',
        src.kind ? h('small', { class: 'muted' }, ` · ${src.kind}`) : null),
      h('td', { class: 'clock' }, clock
        ? h('time', { datetime: new Date(parseTime(c.watermark)).toISOString() }, clock,
          h('small', { class: 'muted' }, ' UTC'))
        : h('span', { class: 'muted' }, 'not started')),
      h('td', { class: 'num' }, fmtInt(c.counted_events)),
      h('td', { class: late ? 'num late' : 'num' }, fmtInt(c.late_events)),
      h('td', { class: 'num' }, fmtDuration(c.bucket_s) || '—'),
      h('td', { class: 'muted', title: c.advanced_at || null }, fmtAgo(c.advanced_at)));
  }

  async function refreshStreams() {
    try {
      const page = await api(API.streams);
      const rows = Array.isArray(page.results) ? page.results : [];
      $('streams-body').replaceChildren(...rows.map(streamRow));
      $('streams-empty').hidden = rows.length > 0;
      showError('streams-error', null, null);
      markUpdated('streams-updated');
      if (page.next) setText('streams-updated', `first ${STREAMS_PAGE} of ${fmtInt(page.count)} · ${$('streams-updated').textContent}`);
    } catch (err) {
      showError('streams-error', 'streams', err, 'Retrying every 3 s.');
    }
  }

  // ------------------------------------------------------- sources' health

  const STATE_LABELS = {
    running: 'running', backing_off: 'backing off', failing: 'failing', disabled: 'disabled',
  };

  function sourceRow(src) {
    const state = STATE_LABELS[src.state] ? src.state : 'running';
    const toggle = h('button', { type: 'button', class: 'btn btn-quiet' },
      src.enabled ? 'Disable' : 'Enable');
    toggle.addEventListener('click', () => setEnabled(src, !src.enabled, toggle));
    const edit = h('button', { type: 'button', class: 'btn btn-quiet' }, 'Edit');
    edit.addEventListener('click', () => openEditor(src));
    const error = src.last_error
      ? `${src.error_permanent ? 'permanent: ' : ''}${src.last_error}` : '';
    return h('tr', { dataset: { source: String(src.id) } },
      h('td', { class: 'source' }, src.name ?? '—', h('small', { class: 'muted' }, ` · ${src.kind}`)),
      h('td', null, h('span', { class: `state state-${state}` }, STATE_LABELS[state])),
      h('td', { class: 'muted', title: src.last_received_at || null },
        src.last_received_at ? fmtAgo(src.last_received_at) : 'none yet'),
      h('td', { class: 'num' }, fmtInt(src.events_last_hour)),
      h('td', { class: 'error', title: src.last_error_at || null }, error || '—'),
      h('td', null, src.kind === 'replay' ? null : toggle,
        EDITABLE.has(src.kind) ? edit : null));
  }

  // ------------------------------------------------------------ edit a source

  const EDITABLE = new Set(['rss', 'x', 'telegram', 'webhook']);
  const listOf = (value) => String(value || '').split(',').map((v) => v.trim()).filter(Boolean);
  let editing = null;

  function openEditor(src) {
    const form = $('edit-source');
    editing = src;
    form.reset();
    setText('edit-source-title', `${src.name} · ${src.kind}`);
    for (const label of form.querySelectorAll('label[data-for]')) {
      label.hidden = !label.dataset.for.split(' ').includes(src.kind);
    }
    const config = src.config || {};
    form.elements.name.value = src.name || '';
    form.elements.url.value = config.url || '';
    form.elements.keywords.value = (config.keywords || []).join(', ');
    form.elements.channels.value = (config.channels || []).join(', ');
    form.elements.poll_interval_s.value = config.poll_interval_s ?? '';
    form.hidden = false;
    form.elements.name.focus();
  }

  /** The PATCH body of the edit form: the kind's whole config, credentials if given. */
  function editBody(src, data) {
    const body = { name: String(data.get('name') || '').trim() };
    const interval = Number.parseInt(String(data.get('poll_interval_s') || ''), 10);
    const config = { ...(src.config || {}) };
    if (src.kind === 'rss') config.url = String(data.get('url') || '').trim();
    if (src.kind === 'x') config.keywords = listOf(data.get('keywords'));
    if (src.kind === 'telegram') config.channels = listOf(data.get('channels'));
    if (src.kind !== 'webhook') {
      if (Number.isFinite(interval)) config.poll_interval_s = interval;
      body.config = config;
    }
    if (src.kind === 'x' && data.get('bearer_token')) {
      body.credentials = { bearer_token: String(data.get('bearer_token')) };
    }
    if (src.kind === 'telegram' && data.get('api_id')) {
      body.credentials = {
        api_id: Number.parseInt(String(data.get('api_id')), 10),
        api_hash: String(data.get('api_hash') || ''),
        session: String(data.get('session') || ''),
      };
    }
    return body;
  }

  $('edit-source-cancel')?.addEventListener('click', () => { $('edit-source').hidden = true; });
  $('edit-source')?.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const form = ev.currentTarget;
    if (!editing) return;
    const button = form.querySelector('button[type="submit"]');
    button.disabled = true;
    try {
      await api(`${API.sources}${encodeURIComponent(editing.id)}/`,
        { method: 'PATCH', body: editBody(editing, new FormData(form)) });
      form.hidden = true;
      showError('sources-error', null, null);
      await refreshSources();
    } catch (err) {
      const el = $('sources-error');
      el.hidden = false;
      el.textContent = err.status === 403
        ? `Only an owner of the source's team can edit ${editing.name}.`
        : `Not saved: ${err.data && !err.data.detail ? fieldErrors(err.data) : err.message}.`;
    } finally {
      button.disabled = false;
    }
  });

  async function refreshSources() {
    try {
      const page = await api(`${API.sources}?page_size=100`);
      const rows = Array.isArray(page.results) ? page.results : [];
      $('sources-body').replaceChildren(...rows.map(sourceRow));
      $('sources-empty').hidden = rows.length > 0;
      showError('sources-error', null, null);
      markUpdated('sources-updated');
    } catch (err) {
      showError('sources-error', 'sources', err, 'Retrying every 5 s.');
    }
  }

  async function setEnabled(src, enabled, button) {
    button.disabled = true;
    try {
      await api(`${API.sources}${encodeURIComponent(src.id)}/`, { method: 'PATCH', body: { enabled } });
      await refreshSources();
    } catch (err) {
      const el = $('sources-error');
      el.hidden = false;
      el.textContent = err.status === 403
        ? `Only an owner of the source's team can ${enabled ? 'enable' : 'disable'} it.`
        : `Couldn't change ${src.name}: ${err.message}.`;
    } finally {
      button.disabled = false;
    }
  }

  /** DRF's field errors ({"config": {"url": ["…"]}, "name": ["…"]}) as one line. */
  function fieldErrors(data) {
    const parts = [];
    const walk = (value, path) => {
      if (Array.isArray(value)) parts.push(`${path}: ${value.join(' ')}`);
      else if (value && typeof value === 'object') {
        for (const [key, inner] of Object.entries(value)) walk(inner, path ? `${path}.${key}` : key);
      } else if (value !== undefined) parts.push(path ? `${path}: ${value}` : String(value));
    };
    walk(data, '');
    return parts.join('; ');
  }

  async function createSource(body) {
    try {
      return await api(API.sources, { method: 'POST', body });
    } catch (err) {
      if (err.status === 403) throw new Error('only a team owner can add sources');
      if (err.data && !err.data.detail) throw new Error(fieldErrors(err.data));
      throw err;
    }
  }

  function wireSourceForm(id, build, done) {
    const form = $(id);
    if (!form) return;
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const button = form.querySelector('button[type="submit"]');
      button.disabled = true;
      try {
        const created = await createSource(build(new FormData(form)));
        showError('source-form-error', null, null);
        form.reset();
        done(created);
        await refreshSources();
      } catch (err) {
        const el = $('source-form-error');
        el.hidden = false;
        el.textContent = `Not added: ${err.message}.`;
      } finally {
        button.disabled = false;
      }
    });
  }

  wireSourceForm('add-feed', (data) => ({
    kind: 'rss',
    name: String(data.get('name') || '').trim(),
    config: {
      url: String(data.get('url') || '').trim(),
      poll_interval_s: Number.parseInt(String(data.get('poll_interval_s') || '300'), 10),
    },
  }), () => {});
  wireSourceForm('add-x', (data) => ({
    kind: 'x',
    name: String(data.get('name') || '').trim(),
    config: { keywords: listOf(data.get('keywords')), stream: data.get('stream') === 'on' },
    credentials: { bearer_token: String(data.get('bearer_token') || '') },
  }), () => {});
  wireSourceForm('add-telegram', (data) => {
    const credentials = {
      api_id: Number.parseInt(String(data.get('api_id') || '0'), 10),
      api_hash: String(data.get('api_hash') || ''),
    };
    if (data.get('bot_token')) credentials.bot_token = String(data.get('bot_token'));
    else credentials.session = String(data.get('session') || '');
    return {
      kind: 'telegram',
      name: String(data.get('name') || '').trim(),
      config: { channels: listOf(data.get('channels')) },
      credentials,
    };
  }, () => {});
  wireSourceForm('add-webhook', (data) => ({
    kind: 'webhook',
    name: String(data.get('name') || '').trim(),
  }), (created) => {
    setText('webhook-secret-name', created.name);
    setText('webhook-secret-value', created.secret || '');
    setText('webhook-secret-url',
      `${window.location.origin}/api/ingest/webhooks/${created.id}/`);
    $('webhook-secret').hidden = false;
  });

  // ---------------------------------------------------- posts behind a trend

  let postsRequest = 0;
  let postsNext = null;

  function scoresTitle(scores) {
    if (!scores || typeof scores !== 'object') return '';
    return Object.entries(scores).map(([label, p]) => `${label} ${fmt2(p)}`).join(' · ');
  }

  /** The post's sentiment label and the model that gave it (a trained head, or VADER). */
  function sentimentBadge(e) {
    const label = typeof e.sentiment_label === 'string' && e.sentiment_label ? e.sentiment_label : null;
    if (!label) return null;
    const byVader = !e.sentiment_model || e.sentiment_model === 'vader';
    const known = ['positive', 'negative', 'neutral'].includes(label);
    const detail = byVader
      ? `VADER compound ${isNum(e.sentiment) ? fmt2(e.sentiment) : '—'}`
      : `${e.sentiment_model}: ${scoresTitle(e.sentiment_scores)}`;
    return h('span', { class: `sentiment ${known ? `sentiment-${label}` : ''}`, title: detail },
      label, h('small', { class: 'model' }, byVader ? ' · VADER' : ` · ${e.sentiment_model}`));
  }

  function labelBadge(e, task) {
    const label = typeof e[task] === 'string' && e[task] ? e[task] : null;
    if (!label) return null;
    const model = e[`${task}_model`] || '';
    return h('span', {
      class: `label label-${task} ${task === 'offensive' && label === 'offensive' ? 'label-warn' : ''}`,
      title: `${task} by ${model}: ${scoresTitle(e[`${task}_scores`])}`,
    }, label);
  }

  /** The post's virality at posting time and the model that gave it (none: not scored). */
  function viralityBadge(e) {
    if (!isNum(e.virality_score)) return null;
    return h('span', {
      class: `label label-virality ${e.virality_score >= 0.5 ? 'label-hot' : ''}`,
      title: `P(viral) at posting time, from the author's earlier posts, by ${e.virality_model || 'a virality model'}`,
    }, `virality ${fmt2(e.virality_score)}`,
    h('small', { class: 'model' }, e.virality_model ? ` · ${e.virality_model}` : ''));
  }

  function safeHttpUrl(link) {
    if (typeof link !== 'string' || link === '') return null;
    try {
      const u = new URL(link);
      return u.protocol === 'https:' || u.protocol === 'http:' ? u.href : null;
    } catch (err) {
      return null;
    }
  }

  function postItem(e) {
    const author = e.author || {};
    const link = safeHttpUrl(e.url);
    return h('li', { class: 'post' },
      h('div', { class: 'post-meta' },
        h('span', { class: 'handle', title: author.name || null },
          author.handle ? `@${author.handle}` : (author.name || 'unknown author')),
        timeEl(e.created_at),
        sentimentBadge(e),
        labelBadge(e, 'emotion'),
        labelBadge(e, 'offensive'),
        viralityBadge(e),
        link ? h('a', { href: link, target: '_blank', rel: 'noopener noreferrer' }, 'original') : null),
      h('p', { class: 'post-text', lang: e.lang || null }, e.text ?? ''));
  }

  async function loadPosts(url, token, append) {
    try {
      const page = await api(url);
      if (token !== postsRequest) return;
      const rows = Array.isArray(page.results) ? page.results : [];
      const items = rows.map(postItem);
      if (append) $('posts-list').append(...items);
      else $('posts-list').replaceChildren(...items);
      $('posts-empty').hidden = append || rows.length > 0;
      postsNext = sameOriginPath(page.next);
      $('posts-more').hidden = !postsNext;
      showError('posts-error', null, null);
    } catch (err) {
      if (token !== postsRequest) return;
      if (!append) $('posts-list').replaceChildren();
      showError('posts-error', 'posts', err);
    }
  }

  /** Open the posts panel for a trend ({id, term, source}); from the table or an alert. */
  function showPosts(trend) {
    selectedTrendId = trend.id;
    selectRow(trend.id);
    postsRequest += 1;
    postsNext = null;
    const panel = $('posts');
    panel.hidden = false;
    const title = $('posts-title');
    title.replaceChildren('Posts behind ', h('q', null, trend.term || `trend ${trend.id}`),
      trend.source ? h('small', { class: 'muted' }, ` · ${trend.source}`) : null);
    $('posts-list').replaceChildren(h('li', { class: 'muted loading' }, 'Loading…'));
    $('posts-empty').hidden = true;
    $('posts-more').hidden = true;
    showError('posts-error', null, null);
    loadPosts(API.events(trend.id), postsRequest, false);
    panel.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
  }

  $('posts-close').addEventListener('click', () => {
    postsRequest += 1;
    selectedTrendId = null;
    selectRow(null);
    $('posts').hidden = true;
  });
  $('posts-more').addEventListener('click', () => {
    if (postsNext) loadPosts(postsNext, postsRequest, true);
  });

  // ------------------------------------------------------------ alerts feed

  const alerts = new Map(); // alert id -> alert
  const alertEls = new Map(); // alert id -> <li>
  // team id (string) -> the seq up to which every alert of the team is held (or was
  // never written: a seq may be skipped). Set by the first hello; moved on by
  // contiguous pushes and by catch-ups.
  const heldSeq = new Map();
  const wantSeq = new Map(); // team id -> the highest seq known to exist (hello, push)

  /** Processing-time latency: pushed_at − event_received_at, in ms. */
  function alertLatencyMs(a) {
    const pushed = parseTime(a.pushed_at);
    const received = parseTime(a.event_received_at);
    if (Number.isFinite(pushed) && Number.isFinite(received)) return pushed - received;
    return isNum(a.latency_ms) ? a.latency_ms : null;
  }

  function alertItem(a, fresh) {
    const sev = SEVERITIES.has(a.severity) ? a.severity : 'info';
    const ev = a.evidence || {};
    const latency = alertLatencyMs(a);
    const evidenceTime = a.event_created_at || ev.bucket_start;
    const li = h('li', {
      class: `alert sev-${sev}${fresh ? ' is-new' : ''}`,
      dataset: { id: String(a.id), team: String(a.team ?? ''), seq: String(a.seq ?? '') },
    },
      h('div', { class: 'alert-head' },
        h('span', { class: `badge badge-${sev}` }, sev),
        h('span', { class: 'alert-title' }, a.title ?? '')),
      h('div', { class: 'alert-meta' },
        h('span', null, 'rule ', h('strong', null, a.rule?.name ?? '—')),
        h('span', null, 'evidence ', timeEl(evidenceTime), h('small', { class: 'muted' }, ' UTC')),
        h('span', { class: latency !== null && latency > 2000 ? 'latency slow' : 'latency' },
          'latency ', h('strong', null, latency === null ? '—' : `${fmtInt(latency)} ms`))),
      ev.term ? h('div', { class: 'alert-evidence' },
        h('q', null, ev.term), ' ',
        `${fmtInt(ev.events)} events vs ${fmt1(ev.expected)} expected · score ${fmt2(ev.score)}`,
        isNum(ev.authors_count) ? ` · ${fmtInt(ev.authors_count)} authors` : '',
        ev.source?.name ? ` · ${ev.source.name}` : '') : null,
      storyLine(ev.story, a.updated_at),
      anomalyLine(a),
      viralLine(a),
      a.trend !== null && a.trend !== undefined
        ? h('button', {
          type: 'button',
          class: 'btn btn-link',
          onclick: () => showPosts({ id: a.trend, term: ev.term, source: ev.source?.name }),
        }, 'Show posts')
        : null);
    return li;
  }

  /** An anomaly alert's window: from its start to its end so far, ongoing or ended. */
  function anomalyLine(a) {
    const ev = a.evidence || {};
    if (a.anomaly === null || a.anomaly === undefined || !ev.window_start) return null;
    return h('div', { class: 'alert-evidence' },
      'window ', timeEl(ev.window_start), ' – ', timeEl(ev.window_end),
      h('small', { class: 'muted' }, ' UTC'),
      ev.closed === false ? ' · ongoing' : (ev.closed ? ' · ended' : ''),
      a.updated_at ? h('small', { class: 'muted' }, ' · updated ', timeEl(a.updated_at)) : null);
  }

  /** A viral-post alert: the post, its author and the model's P(viral). */
  function viralLine(a) {
    const ev = a.evidence || {};
    if (a.event === null || a.event === undefined || !isNum(ev.virality_score)) return null;
    const url = typeof ev.url === 'string' && /^https?:\/\//.test(ev.url) ? ev.url : null;
    return h('div', { class: 'alert-evidence' },
      h('strong', null, ev.author || 'unknown author'), ': ',
      h('q', null, ev.text || ''), ' ',
      `· P(viral) ${fmt2(ev.virality_score)} (${ev.virality_model || 'model'})`,
      url ? ' · ' : null,
      url ? h('a', { href: url, target: '_blank', rel: 'noopener noreferrer' }, 'open post') : null);
  }

  const STORY_TERMS_SHOWN = 12; // the rest are in the terms' tooltip

  /** The story behind an alert: its first terms, when it last grew, and its forecast. */
  function storyLine(story, updatedAt) {
    if (!story || !Array.isArray(story.terms)) return null;
    const f = story.forecast;
    let peak = '';
    if (f && f.method === 'too_few_buckets') {
      peak = ' · forecast: too few buckets yet';
    } else if (f && isNum(f.peak_volume)) {
      peak = ` · forecast: peak ≈ ${fmtInt(Math.round(f.peak_volume))} posts per bucket`
        + (isNum(f.time_to_peak_s) && f.time_to_peak_s > 0
          ? ` in ${fmt1(f.time_to_peak_s / 3600)} h` : ', now');
    }
    const withdrawn = story.prediction === 'withdrawn';
    return h('div', { class: 'alert-story' },
      story.predicted ? h('span', { class: 'badge badge-prediction' }, 'prediction') : null,
      withdrawn ? h('span', { class: 'badge badge-withdrawn' }, 'did not materialise') : null,
      story.predicted || withdrawn ? ' ' : null,
      story.terms.length > 1 ? `story of ${story.terms.length} terms: ` : 'story: ',
      h('strong', { title: story.terms.join(', ') }, story.terms.slice(0, STORY_TERMS_SHOWN).join(', ')),
      story.terms.length > STORY_TERMS_SHOWN
        ? h('span', { class: 'muted' }, ` and ${story.terms.length - STORY_TERMS_SHOWN} more`) : null,
      updatedAt ? h('small', { class: 'muted' }, ' · updated ', timeEl(updatedAt)) : null,
      peak);
  }

  function alertOrder(a, b) {
    const ta = parseTime(a.created_at);
    const tb = parseTime(b.created_at);
    if (Number.isFinite(ta) && Number.isFinite(tb) && ta !== tb) return tb - ta;
    return Number(b.id) - Number(a.id);
  }

  const highlightUntil = new Map(); // alert id -> epoch ms when its "new" highlight ends

  /** Add or replace an alert; `fresh` (pushed on the socket) highlights a first sighting. */
  function upsertAlert(a, fresh) {
    if (!a || a.id === undefined || a.id === null) return;
    const key = String(a.id);
    const now = Date.now();
    if (fresh && !alerts.has(key)) highlightUntil.set(key, now + HIGHLIGHT_MS);
    alerts.set(key, a);
    // A snapshot may re-send an alert that is still highlighted: the new element keeps
    // the highlight until the same moment.
    const until = highlightUntil.get(key) ?? 0;
    const el = alertItem(a, until > now);
    if (until > now) {
      window.setTimeout(() => {
        el.classList.remove('is-new');
        if (highlightUntil.get(key) === until) highlightUntil.delete(key);
      }, until - now);
    }
    const old = alertEls.get(key);
    if (old) old.replaceWith(el);
    alertEls.set(key, el);
  }

  /** Put the list in order (newest first) with the fewest DOM moves, so highlights keep running. */
  function renderAlerts() {
    const ordered = [...alerts.values()].sort(alertOrder);
    for (const a of ordered.slice(MAX_ALERTS)) {
      const key = String(a.id);
      alertEls.get(key)?.remove();
      alertEls.delete(key);
      alerts.delete(key);
      highlightUntil.delete(key);
    }
    const list = $('alerts-list');
    ordered.slice(0, MAX_ALERTS).forEach((a, i) => {
      const el = alertEls.get(String(a.id));
      if (list.children[i] !== el) list.insertBefore(el, list.children[i] || null);
    });
    $('alerts-empty').hidden = alerts.size > 0;
  }

  function knownMaxSeq(team) {
    let max = 0;
    for (const a of alerts.values()) {
      if (String(a.team) === team && isNum(a.seq) && a.seq > max) max = a.seq;
    }
    return max;
  }

  let snapshotLoading = null;
  let snapshotAgain = false;
  let snapshotsLoaded = 0;

  /** Load the REST snapshot (the newest page, for display) and merge it; coalesces
   * overlapping calls. It does not move `heldSeq`: a page of the newest alerts says
   * nothing of the ones before it (catchUp does). */
  function loadAlertSnapshot() {
    if (snapshotLoading) {
      snapshotAgain = true;
      return snapshotLoading;
    }
    snapshotLoading = (async () => {
      try {
        do {
          snapshotAgain = false;
          const page = await api(API.alerts);
          // After the first snapshot, an alert seen for the first time is news (its push
          // was dropped), so it is highlighted like a pushed one.
          const fresh = snapshotsLoaded > 0;
          for (const a of Array.isArray(page.results) ? page.results : []) upsertAlert(a, fresh);
          snapshotsLoaded += 1;
          renderAlerts();
          showError('alerts-error', null, null);
          markUpdated('alerts-updated');
        } while (snapshotAgain);
      } catch (err) {
        showError('alerts-error', 'alerts', err, 'The feed reloads on the next reconnect.');
        $('alerts-empty').hidden = true;
      } finally {
        snapshotLoading = null;
      }
    })();
    return snapshotLoading;
  }

  const catchUps = new Map(); // team id -> { promise, again } of the running catch-up
  const catchUpRetry = new Map(); // team id -> timer of a catch-up to retry
  const catchUpAttempts = new Map(); // team id -> failed catch-ups in a row

  function catchUpUrl(team) {
    const q = new URLSearchParams({
      team,
      after_seq: String(heldSeq.get(team) ?? 0),
      ordering: 'seq',
      page_size: String(CATCH_UP_PAGE),
    });
    return `${API.alerts}?${q}`;
  }

  /** Fetch every alert of `team` after `heldSeq`, oldest first, page after page until
   * `next` is null; each one is merged once (by id) and moves `heldSeq` on. Overlapping
   * calls for a team coalesce into one more round. On a failure `heldSeq` stays at the
   * last alert merged and the catch-up is retried with backoff (and on the next hello). */
  function catchUp(team) {
    const running = catchUps.get(team);
    if (running) {
      running.again = true;
      return running.promise;
    }
    const state = { again: false, promise: null };
    catchUps.set(team, state);
    window.clearTimeout(catchUpRetry.get(team));
    catchUpRetry.delete(team);
    state.promise = (async () => {
      try {
        do {
          state.again = false;
          // Everything up to `want` was committed before this round's first request.
          const want = wantSeq.get(team) ?? 0;
          let url = catchUpUrl(team);
          while (url) {
            const page = await api(url);
            for (const a of Array.isArray(page.results) ? page.results : []) {
              if (String(a.team) !== team || !isNum(a.seq)) continue;
              upsertAlert(a, !alerts.has(String(a.id)));
              if (a.seq > (heldSeq.get(team) ?? 0)) heldSeq.set(team, a.seq);
            }
            renderAlerts();
            url = sameOriginPath(page.next);
          }
          // Past the last page, a seq up to `want` with no alert was never written.
          if (want > (heldSeq.get(team) ?? 0)) heldSeq.set(team, want);
        } while (state.again);
        catchUpAttempts.delete(team);
        showError('alerts-error', null, null);
        markUpdated('alerts-updated');
      } catch (err) {
        const failures = (catchUpAttempts.get(team) ?? 0) + 1;
        catchUpAttempts.set(team, failures);
        const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** failures);
        showError('alerts-error', 'missed alerts', err, 'Retrying…');
        catchUpRetry.set(team, window.setTimeout(() => {
          catchUpRetry.delete(team);
          catchUp(team);
        }, Math.round(delay * (0.8 + Math.random() * 0.4))));
      } finally {
        catchUps.delete(team);
      }
    })();
    return state.promise;
  }

  /** Note that alerts up to `seq` exist for `team`; catch up when some are not held. */
  function expectSeq(team, seq) {
    if (seq > (wantSeq.get(team) ?? 0)) wantSeq.set(team, seq);
    if (seq > (heldSeq.get(team) ?? 0)) catchUp(team);
  }

  // ------------------------------------------------------------- WebSocket

  const conn = $('conn');
  let socket = null;
  let attempt = 0;
  let reconnectTimer = null;
  let hellos = 0;

  function setConn(state, label) {
    conn.className = `conn conn-${state}`;
    conn.querySelector('.conn-label').textContent = label;
  }

  function onHello(msg) {
    attempt = 0;
    setConn('live', 'live');
    const teams = msg.teams && typeof msg.teams === 'object' ? msg.teams : {};
    let reload = false;
    for (const [key, seq] of Object.entries(teams)) {
      const n = Number(seq);
      if (!Number.isFinite(n)) continue;
      const team = String(key);
      if (!heldSeq.has(team)) {
        // First sight of the team (page load, or a team joined since): what came
        // before is history, shown by the newest-first snapshot; only what comes after
        // this hello is caught up.
        heldSeq.set(team, n);
        wantSeq.set(team, n);
        if (n > knownMaxSeq(team)) reload = true;
        continue;
      }
      // A hello lower than what is held: the server's data was reset; start over there.
      if (n < heldSeq.get(team)) heldSeq.set(team, n);
      expectSeq(team, n);
    }
    hellos += 1;
    if (reload) loadAlertSnapshot();
  }

  function onAlertCreated(msg) {
    const team = String(msg.team);
    const seq = Number(msg.seq);
    if (!msg.alert || !Number.isFinite(seq)) return;
    const held = heldSeq.get(team);
    if (held !== undefined && seq <= held) {
      // A duplicate (it also came in hello's seq, or in a catch-up): merged by id, so
      // it is shown once; news only if this copy is the first to arrive.
      upsertAlert(msg.alert, !alerts.has(String(msg.alert.id)));
      renderAlerts();
      return;
    }
    upsertAlert(msg.alert, true);
    renderAlerts();
    $('alerts-empty').hidden = true;
    if (held === undefined) return; // before the hello: it will say where the team stands
    if (seq === held + 1) {
      heldSeq.set(team, seq);
      if (seq > (wantSeq.get(team) ?? 0)) wantSeq.set(team, seq);
    } else {
      expectSeq(team, seq); // a gap: some alert before this one was dropped
    }
  }

  function onSocketMessage(raw) {
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch (err) {
      console.warn('twiscope.ws.bad_json', err);
      return;
    }
    if (!msg || msg.v !== 1) {
      console.warn('twiscope.ws.unknown_version', msg && msg.v);
      return;
    }
    if (msg.type === 'hello') onHello(msg);
    else if (msg.type === 'alert.created') onAlertCreated(msg);
    else if (msg.type === 'alert.updated') onAlertUpdated(msg);
  }

  /** A story's alert grew (a new member term): replace it in place, no new seq. */
  function onAlertUpdated(msg) {
    if (!msg.alert) return;
    upsertAlert(msg.alert, false);
    renderAlerts();
  }

  /** Why the socket closed, for the header: the server's own codes, else nothing. */
  function closeReason(code) {
    if (code === CLOSE_UNAVAILABLE) return 'server unavailable';
    if (code === CLOSE_UNAUTHENTICATED) return 'signed out';
    if (code === CLOSE_ORIGIN_REFUSED) return 'origin refused';
    return '';
  }

  function scheduleReconnect(code) {
    if (reconnectTimer !== null) return;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
    const delay = Math.round(base * (0.8 + Math.random() * 0.4));
    attempt += 1;
    const why = closeReason(code);
    if (code === CLOSE_UNAUTHENTICATED || code === CLOSE_ORIGIN_REFUSED) $('auth-notice').hidden = false;
    setConn('reconnecting',
      `reconnecting in ${Math.max(1, Math.round(delay / 1000))} s${why ? ` (${why})` : ''}`);
    reconnectTimer = window.setTimeout(() => {
      reconnectTimer = null;
      connect();
    }, delay);
  }

  function connect() {
    if (socket) return;
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    setConn(hellos > 0 ? 'reconnecting' : 'connecting', hellos > 0 ? 'reconnecting…' : 'connecting…');
    let sock;
    try {
      sock = new WebSocket(`${scheme}//${window.location.host}${WS_PATH}`);
    } catch (err) {
      console.warn('twiscope.ws.open_failed', err);
      scheduleReconnect(null);
      return;
    }
    socket = sock;
    sock.addEventListener('message', (ev) => {
      if (socket === sock) onSocketMessage(ev.data);
    });
    sock.addEventListener('close', (ev) => {
      if (socket !== sock) return;
      socket = null;
      scheduleReconnect(ev.code);
    });
  }

  window.addEventListener('online', () => {
    // The network is back: skip the rest of the backoff.
    if (reconnectTimer !== null) {
      window.clearTimeout(reconnectTimer);
      reconnectTimer = null;
      connect();
    }
  });
  window.addEventListener('offline', () => setConn('reconnecting', 'offline'));

  // ----------------------------------------------------------------- start

  chart = makeChart();
  sentimentChart = makeSentimentChart();
  anomalyChart = makeAnomalyChart();
  for (const id of ['series-source', 'series-kind', 'series-term', 'series-watch']) {
    $(id)?.addEventListener('change', () => {
      seriesChosen = true;
      seriesWindow = null;
      refreshAnomalies();
    });
  }
  poll(refreshStats, STATS_EVERY_MS);
  poll(refreshSentiment, SENTIMENT_EVERY_MS);
  poll(refreshAnomalies, ANOMALIES_EVERY_MS);
  poll(refreshTrends, TRENDS_EVERY_MS);
  poll(refreshStreams, STREAMS_EVERY_MS);
  poll(refreshSources, SOURCES_EVERY_MS);
  loadAlertSnapshot().finally(connect);
})();
