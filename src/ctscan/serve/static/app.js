// ctscan web page: send one slice to POST /predict and POST /explain, show the answer.
// Plain JS, no build step, no dependency. The page state is on <body data-state=...>:
// idle | busy | done | error (the browser test waits on it).
"use strict";

(() => {
  const TOKEN_KEY = "ctscan.token";
  const $ = (id) => document.getElementById(id);
  const el = {
    body: document.body,
    file: $("file"),
    drop: $("drop"),
    filename: $("filename"),
    server: $("server"),
    previewBox: $("preview-box"),
    preview: $("preview"),
    previewCaption: $("preview-caption"),
    tokenBox: $("token-box"),
    token: $("token"),
    tokenClear: $("token-clear"),
    error: $("error"),
    errorText: $("error-text"),
    errorFix: $("error-fix"),
    result: $("result"),
    status: $("status"),
    label: $("label"),
    confidence: $("confidence"),
    bars: $("bars"),
    cam: $("cam"),
    camNote: $("cam-note"),
    modelName: $("model-name"),
    modelVersion: $("model-version"),
    modelSha: $("model-sha"),
    modelBackend: $("model-backend"),
    modelCalibration: $("model-calibration"),
    latency: $("latency"),
  };
  let lastFile = null;
  let input = null; // {image_size, resize} of the model, from /ready
  let objectUrls = [];
  let runId = 0; // a newer file makes the answers of an older one stale

  // "large_cell_carcinoma" -> "Large cell carcinoma"
  const pretty = (name) => {
    const text = String(name).replace(/_/g, " ");
    return text.charAt(0).toUpperCase() + text.slice(1);
  };
  const percent = (p) => `${(100 * p).toFixed(1)}%`;

  function token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  function headers() {
    const t = token();
    return t ? { Authorization: `Bearer ${t}` } : {};
  }

  function setState(state, message) {
    el.body.dataset.state = state;
    el.result.setAttribute("aria-busy", state === "busy" ? "true" : "false");
    if (message !== undefined) el.status.textContent = message;
  }

  function showError(error, fix) {
    el.errorText.textContent = error;
    el.errorFix.textContent = fix ? `Fix: ${fix}` : "";
    el.errorFix.hidden = !fix;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.errorText.textContent = "";
    el.errorFix.textContent = "";
  }

  // A failed response -> {error, fix}: the server's JSON, or the status line when it is not JSON.
  async function problem(response) {
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") return { error: body.error, fix: body.fix };
    } catch {
      /* not JSON: fall through */
    }
    return { error: `The server answered ${response.status} ${response.statusText}.`, fix: null };
  }

  function showModel(model) {
    if (!model) return;
    el.modelName.textContent = model.name;
    el.modelVersion.textContent = model.version;
    el.modelSha.textContent = model.sha256 ? model.sha256.slice(0, 12) : "—";
    el.modelSha.title = model.sha256 || "";
    const format = model.format && model.format !== model.backend ? ` (${model.format})` : "";
    const precision = model.precision ? `, ${model.precision}` : "";
    el.modelBackend.textContent = `${model.backend}${format}${precision}`;
    el.modelCalibration.textContent = model.calibration || "uncalibrated";
    el.server.textContent = `Serving ${model.name} · ${model.backend}`;
    el.server.classList.add("ok");
  }

  function resetResult() {
    el.label.textContent = "—";
    el.label.dataset.label = "";
    el.confidence.textContent = "—";
    el.bars.replaceChildren();
    el.cam.hidden = true;
    el.cam.removeAttribute("src");
    el.camNote.textContent = "The heat map appears here after a prediction.";
    el.latency.textContent = "—";
  }

  function showPrediction(answer) {
    el.label.textContent = pretty(answer.label);
    el.label.dataset.label = answer.label;
    el.confidence.textContent = percent(answer.confidence);
    const rows = Object.entries(answer.probabilities).map(([name, p]) => {
      const row = document.createElement("li");
      row.className = name === answer.label ? "bar best" : "bar";
      row.dataset.class = name;
      const text = document.createElement("span");
      text.className = "bar-name";
      text.textContent = pretty(name);
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-label", pretty(name));
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "100");
      track.setAttribute("aria-valuenow", (100 * p).toFixed(1));
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = percent(p);
      row.append(text, track, value);
      return row;
    });
    el.bars.replaceChildren(...rows);
    el.latency.textContent = `${answer.latency_ms.toFixed(1)} ms`;
    showModel(answer.model);
  }

  function showPreview(file) {
    objectUrls.forEach((url) => URL.revokeObjectURL(url));
    objectUrls = [];
    const isImage = /^image\/(png|jpeg)$/.test(file.type) || /\.(png|jpe?g)$/i.test(file.name);
    if (!isImage) {
      el.previewBox.hidden = true;
      return;
    }
    const url = URL.createObjectURL(file);
    objectUrls.push(url);
    el.preview.onerror = () => {
      el.previewBox.hidden = true; // not a picture the browser can show (the server will say)
    };
    el.preview.src = url;
    el.previewCaption.textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KiB`;
    el.previewBox.hidden = false;
  }

  // A PNG or JPEG larger than the model's input is shrunk here to the size the server would
  // resize it to (pad: long side S, crop: short side S, stretch: S x S), so that only a small
  // PNG travels and the server decodes it and need not resize it. Anything else goes as it is.
  async function shrink(file) {
    if (!input || !/^image\/(png|jpeg)$/.test(file.type)) return file;
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      return file; // not a picture the browser can read: the server will say why
    }
    const { width: w, height: h } = bitmap;
    const size = input.image_size;
    const scale = size / (input.resize === "crop" ? Math.min(w, h) : Math.max(w, h));
    if (scale >= 1) {
      bitmap.close();
      return file;
    }
    const stretch = input.resize === "stretch";
    const canvas = document.createElement("canvas");
    canvas.width = stretch ? size : Math.max(1, Math.round(w * scale));
    canvas.height = stretch ? size : Math.max(1, Math.round(h * scale));
    const context = canvas.getContext("2d");
    context.imageSmoothingQuality = "high";
    context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    return blob ? new File([blob], file.name, { type: "image/png" }) : file;
  }

  function post(route, file) {
    const form = new FormData();
    form.append("file", file, file.name);
    return fetch(route, { method: "POST", body: form, headers: headers() });
  }

  async function explain(file, id) {
    el.camNote.textContent = "Computing Grad-CAM…";
    let response;
    try {
      response = await post("/explain", file);
      if (id !== runId) return;
    } catch {
      el.camNote.textContent = "Grad-CAM failed: the server cannot be reached.";
      return;
    }
    if (response.status === 501) {
      el.camNote.textContent = "Grad-CAM not available for this model.";
      return;
    }
    if (!response.ok) {
      const { error } = await problem(response);
      el.camNote.textContent = `Grad-CAM failed: ${error}`;
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    if (id !== runId) return;
    objectUrls.push(url);
    const shown = await new Promise((resolve) => {
      el.cam.onload = () => resolve(true);
      el.cam.onerror = () => resolve(false);
      el.cam.src = url;
    });
    if (id !== runId) return;
    if (!shown) {
      el.camNote.textContent = "Grad-CAM failed: the overlay could not be decoded.";
      return;
    }
    el.cam.hidden = false;
    const label = response.headers.get("X-Label");
    el.camNote.textContent = label
      ? `Regions that raised the score of “${pretty(label).toLowerCase()}” (red: most).`
      : "Regions that raised the score of the predicted class (red: most).";
  }

  async function run(file) {
    const id = ++runId;
    lastFile = file;
    clearError();
    resetResult();
    el.filename.textContent = file.name;
    showPreview(file);
    setState("busy", `Predicting ${file.name}…`);
    let response, upload;
    try {
      upload = await shrink(file);
      if (id !== runId) return;
      // the image itself as the body: no multipart form for the server to parse
      response = await fetch("/predict", {
        method: "POST",
        body: await upload.arrayBuffer(), // bytes, not a Blob: devtools (the test) see them
        headers: { ...headers(), "Content-Type": "application/octet-stream" },
      });
      if (id !== runId) return;
    } catch {
      if (id !== runId) return;
      showError("The server cannot be reached.", "check that `ctscan serve` is running.");
      setState("error", "No answer from the server.");
      return;
    }
    if (response.status === 401) {
      const { error, fix } = await problem(response);
      if (id !== runId) return;
      el.tokenBox.hidden = false;
      showError(error, token() ? "the saved token was refused: enter the right one." : fix);
      setState("error", "A token is needed.");
      el.token.focus();
      return;
    }
    if (!response.ok) {
      const { error, fix } = await problem(response);
      if (id !== runId) return;
      showError(error, fix);
      setState("error", `The server refused the file (${response.status}).`);
      return;
    }
    const answer = await response.json();
    if (id !== runId) return;
    showPrediction(answer);
    el.status.textContent = `Prediction for ${file.name}`;
    await explain(upload, id);
    if (id === runId) setState("done");
  }

  function choose(files) {
    if (files && files.length) run(files[0]);
  }

  // ---- wiring ----------------------------------------------------------------------------

  el.file.addEventListener("change", () => {
    choose(el.file.files);
    el.file.value = ""; // choosing the same file again fires "change" again
  });

  for (const type of ["dragenter", "dragover"]) {
    el.drop.addEventListener(type, (event) => {
      event.preventDefault();
      el.drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    el.drop.addEventListener(type, () => el.drop.classList.remove("over"));
  }
  el.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    el.drop.classList.remove("over");
    choose(event.dataTransfer && event.dataTransfer.files);
  });
  // A file dropped beside the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (!el.drop.contains(event.target)) event.dataTransfer.dropEffect = "none";
  });
  window.addEventListener("drop", (event) => event.preventDefault());

  el.tokenBox.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = el.token.value.trim();
    if (!value) return;
    try {
      sessionStorage.setItem(TOKEN_KEY, value);
    } catch {
      /* storage off: the token is lost on reload */
    }
    el.token.value = "";
    el.tokenBox.hidden = true;
    if (lastFile) run(lastFile);
    else clearError();
  });
  el.tokenClear.addEventListener("click", () => {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      /* nothing saved */
    }
    el.token.value = "";
    el.token.focus();
  });

  // Which model is served (/ready needs no token); asked again while the model loads.
  function checkReady() {
    fetch("/ready")
      .then(async (response) => {
        if (response.ok) {
          const ready = await response.json();
          input = ready.input || null;
          showModel(ready.model);
        } else if (response.status === 503) {
          el.server.textContent = "The model is loading…";
          setTimeout(checkReady, 2000);
        } else {
          el.server.textContent = `The server answered ${response.status} to /ready.`;
          el.server.classList.add("bad");
        }
      })
      .catch(() => {
        el.server.textContent = "The server cannot be reached.";
        el.server.classList.add("bad");
      });
  }
  checkReady();
})();
