// The search page: the query network encodes the dropped image on the server, the gallery answers.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = localStorage.getItem("asymret-key") || "";
keyInput.addEventListener("change", () => { localStorage.setItem("asymret-key", keyInput.value); loadGalleries(); });

function headers() {
  return keyInput.value ? { "X-API-Key": keyInput.value } : {};
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  return body;
}

async function loadGalleries() {
  try {
    const info = await api("/v1/info");
    $("network").textContent = `query network ${info.query_net_name} \u2192 gallery network ${info.gallery_net.backbone}`;
    const nets = info.query_nets || [];
    $("query_net").innerHTML = "";
    for (const net of nets) {  // several query networks search the one gallery network's galleries
      $("query_net").add(new Option(`${net.name}: ${net.description}, ${net.cost.gflops.toFixed(2)} GFLOPs`, net.name));
    }
    $("query-net-choice").hidden = nets.length < 2;
    const { galleries } = await api("/v1/galleries");
    $("gallery").innerHTML = "";
    for (const g of galleries) {
      const option = new Option(`${g.name} (${g.count} items, ${g.factory})`, g.name);
      $("gallery").add(option);
    }
    if (!galleries.length) status("no galleries yet: create one and add images through the API", true);
  } catch (err) {
    status(err.message, true);
  }
}

async function thumbnail(url) {  // fetched with the key header, which an <img src> cannot send
  const response = await fetch(url, { headers: headers() });
  return response.ok ? URL.createObjectURL(await response.blob()) : "";
}

async function search(file) {
  const gallery = $("gallery").value;
  if (!gallery) return status("pick a gallery first", true);
  $("query").src = URL.createObjectURL(file);
  $("query").style.display = "block";
  status("searching\u2026");
  $("results").innerHTML = "";
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value || "12");
  if ($("query_net").value) form.append("query_net", $("query_net").value);
  const started = performance.now();
  try {
    const body = await api(`/v1/galleries/${encodeURIComponent(gallery)}/search/image`, { method: "POST", body: form });
    const roundTrip = performance.now() - started;
    const hits = body.results[0].hits;
    status(`${hits.length} results by ${body.query_net} in ${body.took_ms.toFixed(1)} ms on the server, `
           + `${roundTrip.toFixed(0)} ms round trip`);
    hits.forEach((hit, i) => $("results").append(card(hit, i + 1)));
    await Promise.all(hits.map(async (hit) => {
      document.querySelector(`.hit[data-id="${hit.id}"] img`).src = await thumbnail(hit.thumbnail_url);
    }));
  } catch (err) {
    status(err.message, true);
  }
}

function card(hit, rank) {
  const div = document.createElement("div");
  div.className = "hit";
  div.dataset.id = hit.id;
  const img = document.createElement("img");
  img.alt = `item ${hit.id}`;
  const text = document.createElement("div");
  text.innerHTML = `<span class="rank">#${rank}</span><span class="score"></span><br>`
    + `label <b class="label"></b> \u00b7 camera <span class="camera"></span><br>id ${hit.id}`;
  text.querySelector(".score").textContent = hit.score.toFixed(3);
  text.querySelector(".label").textContent = hit.label ?? "\u2013";
  text.querySelector(".camera").textContent = hit.camera ?? "\u2013";
  div.append(img, text);
  return div;
}

$("file").addEventListener("change", (e) => e.target.files[0] && search(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) search(e.dataTransfer.files[0]);
});
loadGalleries();
