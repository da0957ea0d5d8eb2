// The dinocluster dashboard: plain JavaScript over the service's JSON API.
//
// Pages (location.hash): #/jobs, #/models, #/models/<name>, #/models/<name>/versions/<v>.
// Every text that comes from the API goes into the page as text (textContent,
// attributes), never as markup: item ids and names are arbitrary strings.
// The API key (when the service needs one) is typed in once per tab and sent
// as a header; job events are therefore read with fetch() and a stream reader,
// since EventSource cannot send headers.
"use strict";

(() => {
  const ROOT = location.pathname.replace(/\/dashboard\/?$/, "");
  const KEY_STORAGE = "dinocluster.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const JOBS_REFRESH_MS = 3000;
  const MAX_STREAMS = 4; // browsers allow ~6 connections per host; keep some for the rest
  const THUMBS_PER_LOOKUP = 500;
  const PROJECTION_LIMIT = 2000;
  const MOVED_LIMIT = 24;
  const PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
    "#ff9da7", "#9c755f", "#bab0ac", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
    "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
  ];

  const main = document.getElementById("main");
  const errorBox = document.getElementById("error");
  const keyForm = document.getElementById("key-form");
  const keyInput = document.getElementById("key-input");
  const keyButton = document.getElementById("key-button");
  const keyMessage = document.getElementById("key-message");
  const tooltip = document.getElementById("tooltip");

  let apiKey = sessionStorage.getItem(KEY_STORAGE);
  let keyRequired = false;
  let page = new AbortController(); // aborted when the user leaves the page shown

  // ---- small helpers -------------------------------------------------------------

  class AuthError extends Error {}

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    setAttrs(el, attrs);
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
  }

  function fmt(value, digits = 3) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    return value.toFixed(digits);
  }

  function pct(value) {
    return value === null || value === undefined ? "—" : `${(100 * value).toFixed(1)}%`;
  }

  function when(iso) {
    return iso ? new Date(iso).toLocaleString() : "—";
  }

  function seconds(start, end) {
    if (!start) return "—";
    const s = ((end ? new Date(end) : new Date()) - new Date(start)) / 1000;
    return s < 90 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;
  }

  function colour(cluster) {
    if (cluster < PALETTE.length) return PALETTE[cluster];
    return `hsl(${(cluster * 137.508) % 360}, 55%, 50%)`;
  }

  function swatch(cluster) {
    const el = h("span", { class: "swatch" });
    el.style.background = colour(cluster);
    return el;
  }

  function versionHref(name, version) {
    return `#/models/${encodeURIComponent(name)}/versions/${version}`;
  }

  function fact(label, value) {
    return h("div", { class: "fact" }, h("div", { class: "label" }, label),
      h("div", { class: "value" }, value));
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
    });
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.hidden = true;
  }

  // ---- the API -------------------------------------------------------------------

  function headers(extra) {
    return { ...(apiKey ? { Authorization: `Bearer ${apiKey}` } : {}), ...extra };
  }

  async function api(path, { method = "GET", body, signal } = {}) {
    const response = await fetch(ROOT + path, {
      method,
      signal,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      askForKey("The service refused the key: type it again.");
      throw new AuthError("unauthorized");
    }
    const data = await response.json();
    if (!response.ok) {
      throw new Error(data?.error?.message || `${method} ${path}: HTTP ${response.status}`);
    }
    return data;
  }

  // Server-sent events of a job, read with fetch (headers allowed); reconnects with
  // backoff until the job ends or the page is left.
  async function followJob(jobId, onJob, signal) {
    let delay = 1000;
    while (!signal.aborted) {
      try {
        const response = await fetch(`${ROOT}/v1/jobs/${encodeURIComponent(jobId)}/events`, {
          headers: headers({ Accept: "text/event-stream" }),
          signal,
        });
        if (response.status === 401) {
          askForKey("The service refused the key: type it again.");
          return;
        }
        if (!response.ok) return;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = block.split("\n").filter((line) => line.startsWith("data:"))
              .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
            if (!data) continue;
            const job = JSON.parse(data);
            onJob(job);
            if (TERMINAL.has(job.state)) return;
          }
        }
        delay = 1000;
      } catch (err) {
        if (signal.aborted) return;
      }
      await sleep(delay, signal);
      delay = Math.min(2 * delay, 15000);
    }
  }

  // Thumbnails as data URIs, looked up in batches (one request for a whole gallery)
  // and remembered; null for items that have none (added as vectors).
  const thumbCache = new Map();
  const thumbQueue = new Map();
  let thumbFlushScheduled = false;

  function thumbnail(datasetId, itemId) {
    const key = `${datasetId}\u0000${itemId}`;
    if (!thumbCache.has(key)) {
      thumbCache.set(key, new Promise((resolve) => {
        if (!thumbQueue.has(datasetId)) thumbQueue.set(datasetId, new Map());
        thumbQueue.get(datasetId).set(itemId, resolve);
        if (!thumbFlushScheduled) {
          thumbFlushScheduled = true;
          setTimeout(flushThumbnails, 0);
        }
      }));
    }
    return thumbCache.get(key);
  }

  async function flushThumbnails() {
    const queued = [...thumbQueue.entries()];
    thumbQueue.clear();
    thumbFlushScheduled = false;
    for (const [datasetId, waiting] of queued) {
      const ids = [...waiting.keys()];
      for (let i = 0; i < ids.length; i += THUMBS_PER_LOOKUP) {
        const chunk = ids.slice(i, i + THUMBS_PER_LOOKUP);
        let found = {};
        try {
          const data = await api(`/v1/datasets/${encodeURIComponent(datasetId)}/thumbnails/lookup`,
            { method: "POST", body: { ids: chunk } });
          found = Object.fromEntries(data.thumbnails.map((t) => [t.item_id, t.thumbnail]));
        } catch (err) {
          for (const id of chunk) thumbCache.delete(`${datasetId}\u0000${id}`);
        }
        for (const id of chunk) waiting.get(id)(found[id] ?? null);
      }
    }
  }

  function thumbElement(datasetId, itemId) {
    const holder = h("div", { class: "nothumb pending", title: itemId }, "…");
    thumbnail(datasetId, itemId).then((uri) => {
      if (uri) {
        holder.replaceWith(h("img", { class: "thumb", src: uri, alt: itemId, title: itemId }));
      } else { // added as a vector, or deleted from the dataset since
        holder.classList.remove("pending");
        holder.textContent = itemId;
      }
    });
    return holder;
  }

  // ---- API key -------------------------------------------------------------------

  function askForKey(message) {
    keyMessage.textContent = message || "";
    keyForm.hidden = false;
    main.hidden = true;
    keyInput.focus();
  }

  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = keyInput.value.trim();
    sessionStorage.setItem(KEY_STORAGE, apiKey);
    keyInput.value = "";
    keyForm.hidden = true;
    main.hidden = false;
    thumbCache.clear();
    render();
  });

  keyButton.addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    apiKey = null;
    page.abort();
    askForKey("");
  });

  // ---- jobs ----------------------------------------------------------------------

  function progressDetail(job) {
    const p = job.progress || {};
    const parts = [];
    if (p.stage) parts.push(p.stage);
    if (p.epoch !== null && p.epoch !== undefined && p.epochs) parts.push(`epoch ${p.epoch}/${p.epochs}`);
    if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${fmt(p.loss, 4)}`);
    if (p.label_change !== null && p.label_change !== undefined) {
      parts.push(`label change ${pct(p.label_change)}`);
    }
    if (job.error) parts.push(`${job.error.type}: ${job.error.message}`);
    return parts.join(" · ");
  }

  function jobRow(job) {
    const bar = h("progress", { max: 1 });
    const row = h("tr", { "data-job-id": job.id },
      h("td", {}, h("code", { title: job.id }, job.id.slice(0, 12))),
      h("td", {}, job.type),
      h("td", { class: "model" }),
      h("td", {}, job.algorithm || "—"),
      h("td", { class: "state-cell" }),
      h("td", { class: "progress" }, bar, h("span", { class: "detail" })),
      h("td", { class: "num duration" }),
      h("td", {}, when(job.created_at)),
      h("td", { class: "actions" }));
    return row;
  }

  function updateJobRow(row, job, live) {
    const cells = row.children;
    cells[2].replaceChildren(job.result
      ? h("a", { href: versionHref(job.result.model_name, job.result.version) },
        `${job.result.model_name} v${job.result.version}`)
      : job.model_name || "—");
    cells[4].replaceChildren(h("span", { class: `state ${job.state}` }, job.state));
    if (live) cells[4].append(h("span", { class: "live", title: "following the job's events" }, "● live"));
    const bar = cells[5].querySelector("progress");
    const p = job.progress || {};
    if (job.state === "succeeded") bar.value = 1;
    else if (p.fraction !== null && p.fraction !== undefined) bar.value = p.fraction;
    else if (job.state === "running") bar.removeAttribute("value"); // indeterminate
    else bar.value = 0;
    row.dataset.progress = JSON.stringify([job.state, p.stage ?? null, p.epoch ?? null,
      p.fraction ?? null]);
    cells[5].querySelector(".detail").textContent = progressDetail(job);
    cells[6].textContent = seconds(job.started_at, job.finished_at);
    const actions = cells[8];
    if (TERMINAL.has(job.state)) {
      actions.replaceChildren();
    } else if (!actions.firstChild) {
      actions.append(h("button", {
        type: "button",
        class: "cancel",
        onclick: async (event) => {
          event.target.disabled = true;
          try {
            await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" });
          } catch (err) {
            if (!(err instanceof AuthError)) showError(err.message);
          }
        },
      }, "Cancel"));
    }
  }

  async function jobsPage(signal) {
    const tbody = h("tbody");
    main.replaceChildren(
      h("h1", {}, "Jobs"),
      h("p", { class: "muted" }, "Newest first; running jobs follow their event stream live."),
      h("table", { class: "jobs" },
        h("thead", {}, h("tr", {}, ["Job", "Type", "Model", "Algorithm", "State", "Progress",
          "Duration", "Created", ""].map((t) => h("th", {}, t)))),
        tbody));
    const rows = new Map();
    const streams = new Map();
    const latest = new Map();

    const show = (job) => {
      latest.set(job.id, job);
      let row = rows.get(job.id);
      if (!row) {
        row = jobRow(job);
        rows.set(job.id, row);
      }
      updateJobRow(row, job, streams.has(job.id));
    };

    while (!signal.aborted) {
      try {
        const { jobs } = await api("/v1/jobs?limit=50", { signal });
        const order = [];
        for (const listed of jobs) {
          // a job followed live may be ahead of the list
          const known = latest.get(listed.id);
          show(streams.has(listed.id) && known ? known : listed);
          order.push(rows.get(listed.id));
        }
        if (order.length === 0) {
          tbody.replaceChildren(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No jobs yet.")));
        } else if (order.some((row, i) => tbody.children[i] !== row) || tbody.children.length !== order.length) {
          tbody.replaceChildren(...order);
        }
        for (const job of jobs) {
          if (job.state !== "running" || streams.has(job.id) || streams.size >= MAX_STREAMS) continue;
          streams.set(job.id, true);
          followJob(job.id, show, signal).finally(() => {
            streams.delete(job.id);
            const last = latest.get(job.id);
            if (last && rows.has(job.id)) updateJobRow(rows.get(job.id), last, false);
          });
        }
        clearError();
      } catch (err) {
        if (signal.aborted || err instanceof AuthError) return;
        showError(`Jobs could not be loaded: ${err.message}`);
      }
      await sleep(JOBS_REFRESH_MS, signal);
    }
  }

  // ---- models --------------------------------------------------------------------

  async function modelsPage(signal) {
    const { models } = await api("/v1/models", { signal });
    main.replaceChildren(
      h("h1", {}, "Models"),
      models.length === 0
        ? h("p", { class: "muted" }, "No models yet: a successful training job makes the first version.")
        : h("table", { class: "models" },
          h("thead", {}, h("tr", {}, ["Model", "Latest version", "Aliases", "Created"]
            .map((t) => h("th", {}, t)))),
          h("tbody", {}, models.map((m) => h("tr", {},
            h("td", {}, h("a", { href: `#/models/${encodeURIComponent(m.name)}` }, m.name)),
            h("td", {}, h("a", { href: versionHref(m.name, m.latest_version) }, `v${m.latest_version}`)),
            h("td", {}, aliasChips(m.aliases)),
            h("td", {}, when(m.created_at)))))));
  }

  function aliasChips(aliases) {
    const entries = Object.entries(aliases || {});
    if (entries.length === 0) return h("span", { class: "muted" }, "—");
    return entries.map(([alias, version]) => h("span", { class: "chip" }, `${alias} → v${version}`));
  }

  function metricCells(v) {
    const m = v.metrics || {};
    const sizes = m.sizes || {};
    return [
      h("td", { class: "num" }, fmt(m.silhouette)),
      h("td", { class: "num" }, fmt(m.acc)),
      h("td", { class: "num" }, fmt(m.nmi)),
      h("td", { class: "num" }, fmt(m.ari)),
      h("td", { class: "num" }, sizes.sizes ? `${fmt(sizes.min)}–${fmt(sizes.max)}` : "—"),
    ];
  }

  async function modelPage(name, signal) {
    const model = await api(`/v1/models/${encodeURIComponent(name)}`, { signal });
    const versions = [...model.versions].reverse();
    main.replaceChildren(
      h("h1", {}, `Model ${model.name}`),
      h("div", { class: "card facts" },
        fact("Latest version", `v${model.latest_version}`),
        fact("Versions", model.versions.length),
        fact("Aliases", aliasChips(model.aliases)),
        fact("Created", when(model.created_at))),
      h("h2", {}, "Versions"),
      h("table", { class: "versions" },
        h("thead", {}, h("tr", {}, ["Version", "Algorithm", "k", "Items", "Parent", "Silhouette",
          "ACC", "NMI", "ARI", "Sizes", "Kept", "Fit", "Created"]
          .map((t, i) => h("th", { class: i >= 2 && i !== 4 && i < 12 ? "num" : null }, t)))),
        h("tbody", {}, versions.map((v) => h("tr", { "data-version": v.version },
          h("td", {}, h("a", { href: versionHref(name, v.version) }, `v${v.version}`)),
          h("td", {}, v.algorithm),
          h("td", { class: "num" }, fmt(v.n_clusters)),
          h("td", { class: "num" }, fmt(v.item_count)),
          h("td", {}, v.parent_version ? h("a", { href: versionHref(name, v.parent_version) },
            `v${v.parent_version}`) : "—"),
          metricCells(v),
          h("td", { class: "num" }, v.stability ? pct(v.stability.kept_fraction) : "—"),
          h("td", { class: "num" }, v.fit_seconds === null ? "—" : `${fmt(v.fit_seconds, 1)} s`),
          h("td", {}, when(v.created_at)))))),
      h("h2", {}, "Alias history"),
      model.alias_history.length === 0
        ? h("p", { class: "muted" }, "No alias has been set.")
        : h("table", { class: "alias-history" },
          h("thead", {}, h("tr", {}, ["When", "Alias", "From", "To"].map((t) => h("th", {}, t)))),
          h("tbody", {}, [...model.alias_history].reverse().map((e) => h("tr", {},
            h("td", {}, when(e.changed_at)),
            h("td", {}, e.alias),
            h("td", {}, e.previous_version ? `v${e.previous_version}` : "—"),
            h("td", {}, h("a", { href: versionHref(name, e.version) }, `v${e.version}`)))))));
  }

  // ---- a version -----------------------------------------------------------------

  // ``compareWith``: the version the stability view compares with (default: the parent)
  async function versionPage(name, number, compareWith, signal) {
    const base = `/v1/models/${encodeURIComponent(name)}/versions/${number}`;
    const v = await api(base, { signal });
    const from = compareWith || v.parent_version;
    const [model, clusters, projection, transitions] = await Promise.all([
      api(`/v1/models/${encodeURIComponent(name)}`, { signal }),
      api(`${base}/clusters`, { signal }),
      api(`${base}/projection?limit=${PROJECTION_LIMIT}`, { signal }),
      from ? api(`${base}/transitions?from_version=${from}&limit=${MOVED_LIMIT}`, { signal }) : null,
    ]);
    const m = v.metrics || {};
    main.replaceChildren(...[
      h("h1", {}, h("a", { href: `#/models/${encodeURIComponent(name)}` }, name), ` v${v.version}`),
      h("div", { class: "card facts", id: "version-facts" },
        fact("Algorithm", v.algorithm),
        fact("Clusters", fmt(v.n_clusters)),
        fact("Items", fmt(v.item_count)),
        fact("Dimension", fmt(v.dim)),
        fact("Dataset", v.dataset_id || "—"),
        fact("Parent", v.parent_version
          ? h("a", { href: versionHref(name, v.parent_version) }, `v${v.parent_version}`) : "—"),
        fact("Seed", fmt(v.seed)),
        fact("Fit", v.fit_seconds === null ? "—" : `${fmt(v.fit_seconds, 1)} s`),
        fact("Silhouette", fmt(m.silhouette)),
        m.acc !== undefined ? fact("ACC / NMI / ARI", `${fmt(m.acc)} / ${fmt(m.nmi)} / ${fmt(m.ari)}`) : null,
        v.k_selection ? fact("k chosen", `${fmt(v.k_selection.best_k)} (${v.k_selection.criterion || "auto"})`) : null,
        fact("Created", when(v.created_at))),
      h("h2", {}, "Clusters"),
      gallery(v, clusters.clusters),
      h("h2", {}, "Projection"),
      scatter(v, projection),
      compareControl(v, model.versions.map((x) => x.version), from),
      transitions ? stabilityView(v, transitions) : null,
    ].filter(Boolean));
  }

  function gallery(v, clusters) {
    const total = clusters.reduce((sum, c) => sum + c.size, 0) || 1;
    const biggest = Math.max(1, ...clusters.map((c) => c.size));
    const sorted = [...clusters].sort((a, b) => b.size - a.size || a.cluster - b.cluster);
    return h("div", { class: "gallery" }, sorted.map((c) => {
      const fill = h("div");
      fill.style.width = `${(100 * c.size) / biggest}%`;
      fill.style.background = colour(c.cluster);
      return h("div", { class: "card cluster", "data-cluster": c.cluster },
        h("h3", {}, swatch(c.cluster), `Cluster ${c.cluster}`,
          h("span", { class: "muted size" }, ` · ${fmt(c.size)} items (${pct(c.size / total)})`)),
        h("div", { class: "sizebar" }, fill),
        c.exemplars.length === 0
          ? h("p", { class: "muted" }, "empty")
          : h("div", { class: "thumbs" }, c.exemplars.map((id) => thumbElement(v.dataset_id, id))));
    }));
  }

  function extent(values) {
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (!Number.isFinite(lo)) return [-1, 1];
    if (hi - lo < 1e-12) { lo -= 1; hi += 1; }
    const pad = (hi - lo) * 0.05;
    return [lo - pad, hi + pad];
  }

  function scatter(v, projection) {
    const W = 640;
    const H = 480;
    const points = projection.points;
    const [x0, x1] = extent(points.map((p) => p.x));
    const [y0, y1] = extent(points.map((p) => p.y));
    const plot = svg("svg", { class: "scatter", viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "items projected to 2-D, coloured by cluster" });
    const radius = points.length > 1000 ? 3 : 4.5;
    for (const p of points) {
      const dot = svg("circle", {
        cx: (((p.x - x0) / (x1 - x0)) * W).toFixed(2),
        cy: (H - ((p.y - y0) / (y1 - y0)) * H).toFixed(2),
        r: radius,
        fill: colour(p.cluster),
        "data-cluster": p.cluster,
      });
      dot.addEventListener("mouseenter", (event) => showTooltip(event, v.dataset_id, p));
      dot.addEventListener("mousemove", moveTooltip);
      dot.addEventListener("mouseleave", hideTooltip);
      plot.append(dot);
    }
    const clusterIds = [...new Set(points.map((p) => p.cluster))].sort((a, b) => a - b);
    const counts = new Map();
    for (const p of points) counts.set(p.cluster, (counts.get(p.cluster) || 0) + 1);
    const legend = h("div", { class: "legend" }, clusterIds.map((c) => h("button", {
      type: "button",
      onmouseenter: () => {
        plot.classList.add("focus");
        for (const dot of plot.querySelectorAll(`circle[data-cluster="${c}"]`)) dot.classList.add("on");
      },
      onmouseleave: () => {
        plot.classList.remove("focus");
        for (const dot of plot.querySelectorAll("circle.on")) dot.classList.remove("on");
      },
    }, swatch(c), `cluster ${c} (${counts.get(c)})`)));
    const ratio = projection.explained_variance_ratio.map(pct).join(" + ");
    return h("div", { class: "card" },
      h("p", { class: "muted projection-note" },
        `${fmt(points.length)} of ${fmt(projection.total)} items (seeded sample), PCA of their vectors`
        + ` (${ratio} of the variance)`
        + (projection.missing ? `; ${fmt(projection.missing)} items were deleted from the dataset since` : "")
        + ". Hover a point to see its image."),
      h("div", { class: "plot-row" }, plot, legend));
  }

  let tooltipFor = null;

  function showTooltip(event, datasetId, point) {
    tooltipFor = point;
    const caption = h("div", { class: "caption" }, `${point.item_id} · cluster ${point.cluster}`);
    tooltip.replaceChildren(caption);
    tooltip.hidden = false;
    moveTooltip(event);
    thumbnail(datasetId, point.item_id).then((uri) => {
      if (tooltipFor !== point) return;
      if (uri) tooltip.prepend(h("img", { src: uri, alt: point.item_id }));
      else caption.append(h("div", { class: "muted" }, "(no image: added as a vector)"));
    });
  }

  function moveTooltip(event) {
    const x = Math.min(event.clientX + 14, window.innerWidth - 240);
    const y = Math.min(event.clientY + 14, window.innerHeight - 160);
    tooltip.style.left = `${x}px`;
    tooltip.style.top = `${y}px`;
  }

  function hideTooltip() {
    tooltipFor = null;
    tooltip.hidden = true;
  }

  function compareControl(v, numbers, from) {
    const others = numbers.filter((n) => n !== v.version);
    if (others.length === 0) return null;
    const select = h("select", {
      id: "compare",
      onchange: (event) => {
        const chosen = event.target.value;
        location.hash = versionHref(v.model_name, v.version)
          + (chosen && Number(chosen) !== v.parent_version ? `?from=${chosen}` : "");
      },
    }, h("option", { value: "" }, "—"), others.map((n) => h("option", { value: n, selected: n === from },
      n === v.parent_version ? `v${n} (parent)` : `v${n}`)));
    return h("p", {}, h("label", { for: "compare" }, "Compare with version "), select);
  }

  function stabilityView(v, t) {
    // the update's own report holds what only its training knew (ARI, centroid shift)
    const s = t.is_parent ? v.stability || {} : {};
    const otherHref = versionHref(v.model_name, t.from_version);
    return h("section", { id: "stability" },
      h("h2", {}, t.is_parent ? "Stability against its parent " : "Compared with ",
        h("a", { href: otherHref }, `v${t.from_version}`)),
      h("div", { class: "card facts" },
        fact("Kept their cluster", pct(t.kept_fraction)),
        fact("ARI", fmt(s.ari)),
        fact("Moved", fmt(t.moved)),
        fact("Retained / added / removed",
          `${fmt(t.items_shared)} / ${fmt(t.items_added)} / ${fmt(t.items_removed)}`),
        fact("Emptied clusters", t.emptied_clusters.length ? t.emptied_clusters.join(", ") : "none"),
        fact("Centroid shift mean / max",
          `${fmt(s.centroid_shift_mean)} / ${fmt(s.centroid_shift_max)}`)),
      h("div", { class: "two-col" },
        h("div", {}, h("h2", {}, "Centroid shift per cluster"), shiftBars(t.centroid_shift)),
        h("div", {}, h("h2", {}, `Where the items of v${t.from_version} went`), transitionMatrix(t))),
      h("h2", {}, "Moved items"),
      movedTable(v, t));
  }

  function shiftBars(shift) {
    if (!shift || shift.length === 0) {
      return h("p", { class: "muted" }, "Reported by an update against its parent only.");
    }
    const W = 520;
    const rowH = 18;
    const H = shift.length * rowH + 10;
    const biggest = Math.max(1e-12, ...shift.map((x) => x || 0));
    const chart = svg("svg", { class: "bars", viewBox: `0 0 ${W} ${H}`, width: W });
    shift.forEach((value, c) => {
      const y = 5 + c * rowH;
      chart.append(
        svg("text", { x: 4, y: y + 12 }, `cluster ${c}`),
        svg("rect", { x: 80, y: y + 2, height: rowH - 6, width: (((value || 0) / biggest) * 360).toFixed(1),
          fill: colour(c) }, svg("title", {}, `cluster ${c}: ${fmt(value, 4)}`)),
        svg("text", { x: 86 + ((value || 0) / biggest) * 360, y: y + 12 }, fmt(value, 4)));
    });
    return chart;
  }

  function transitionMatrix(t) {
    const rows = t.from_sizes.length;
    const cols = t.to_sizes.length;
    if (rows > 40 || cols > 40) {
      const top = [...t.transitions].filter((x) => x.from_cluster !== x.to_cluster)
        .sort((a, b) => b.count - a.count).slice(0, 30);
      return h("table", { class: "transitions" },
        h("thead", {}, h("tr", {}, ["From", "To", "Items"].map((x) => h("th", {}, x)))),
        h("tbody", {}, top.map((x) => h("tr", {},
          h("td", {}, swatch(x.from_cluster), x.from_cluster),
          h("td", {}, swatch(x.to_cluster), x.to_cluster),
          h("td", { class: "num" }, fmt(x.count))))));
    }
    const cell = Math.max(14, Math.min(36, Math.floor(420 / Math.max(rows, cols))));
    const left = 64;
    const top = 40;
    const W = left + cols * cell + 10;
    const H = top + rows * cell + 10;
    const biggest = Math.max(1, ...t.transitions.map((x) => x.count));
    const chart = svg("svg", { class: "matrix", viewBox: `0 0 ${W} ${H}`, width: W });
    chart.append(svg("text", { x: left, y: 12 }, `to cluster (v${t.version}) →`),
      svg("text", { x: 2, y: top - 6 }, `from (v${t.from_version})`));
    for (let c = 0; c < cols; c++) {
      chart.append(svg("text", { x: left + c * cell + cell / 2 - 3, y: top - 6 }, c));
    }
    for (let r = 0; r < rows; r++) {
      chart.append(svg("text", { x: left - 18, y: top + r * cell + cell / 2 + 3 }, r));
    }
    for (const x of t.transitions) {
      const share = x.count / biggest;
      const kept = x.from_cluster === x.to_cluster;
      chart.append(svg("rect", {
        class: kept ? "cell kept" : "cell moved",
        x: left + x.to_cluster * cell + 1,
        y: top + x.from_cluster * cell + 1,
        width: cell - 2,
        height: cell - 2,
        fill: kept ? "#2f6fde" : "#e15759",
        "fill-opacity": (0.15 + 0.85 * share).toFixed(3),
      }, svg("title", {}, `${fmt(x.count)} items: cluster ${x.from_cluster} → ${x.to_cluster}`)));
    }
    return h("div", {}, chart,
      h("p", { class: "muted" }, "Rows: clusters of the earlier version; columns: this version. "
        + "Blue: items that kept their cluster id; red: items that moved."));
  }

  function movedTable(v, t) {
    if (t.moved_items.length === 0) return h("p", { class: "muted" }, "No item changed cluster.");
    return h("div", {},
      h("p", { class: "muted" }, `${fmt(t.moved_items.length)} of ${fmt(t.moved)} moved items (seeded sample).`),
      h("table", { class: "moved" },
        h("thead", {}, h("tr", {}, ["", "Item", "From", "To", "Probability"].map((x) => h("th", {}, x)))),
        h("tbody", {}, t.moved_items.map((item) => h("tr", {},
          h("td", {}, thumbElement(v.dataset_id, item.item_id)),
          h("td", {}, item.item_id),
          h("td", {}, swatch(item.from_cluster), item.from_cluster),
          h("td", {}, swatch(item.to_cluster), item.to_cluster),
          h("td", { class: "num" }, fmt(item.probability)))))));
  }

  // ---- routing -------------------------------------------------------------------

  async function render() {
    page.abort();
    page = new AbortController();
    const signal = page.signal;
    hideTooltip();
    clearError();
    if (keyRequired && !apiKey) {
      askForKey("");
      return;
    }
    const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
    const parts = path.split("/").map(decodeURIComponent);
    const params = new URLSearchParams(query || "");
    for (const link of document.querySelectorAll("header nav a")) {
      link.classList.toggle("active", link.dataset.nav === (parts[0] || "jobs"));
    }
    main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      if (parts[0] === "models" && parts.length === 4 && parts[2] === "versions") {
        await versionPage(parts[1], Number(parts[3]), Number(params.get("from")) || null, signal);
      } else if (parts[0] === "models" && parts[1]) {
        await modelPage(parts[1], signal);
      } else if (parts[0] === "models") {
        await modelsPage(signal);
      } else {
        await jobsPage(signal);
      }
    } catch (err) {
      if (signal.aborted || err instanceof AuthError) return;
      main.replaceChildren();
      showError(err.message);
    }
  }

  async function start() {
    try {
      const info = await (await fetch(`${ROOT}/info`)).json();
      keyRequired = Boolean(info.api_key_required);
      document.getElementById("service").textContent = `clustering service ${info.version}`;
    } catch (err) {
      showError("The clustering service does not answer.");
    }
    keyButton.hidden = !keyRequired;
    window.addEventListener("hashchange", render);
    render();
  }

  start();
})();
