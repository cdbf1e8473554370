// The lipsync viewer: uploads a clip to POST /session, reads the frame stream (newline-delimited JSON), and draws
// the latest frame whose timestamp is <= the clock on a canvas. The clock is the clip's own <audio> element; when the
// audio cannot play (autoplay blocked, no audio device, a format the browser cannot play), a performance.now() clock.
//
// Query string (so it can be driven without a person): ?model=ID&start_frame=N&clip=/same/origin/path&autoplay=1
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"),
    startFrame: $("start-frame"),
    file: $("file"),
    record: $("record"),
    sample: $("sample"),
    play: $("play"),
    stop: $("stop"),
    clipInfo: $("clip-info"),
    status: $("status"),
    received: $("received"),
    shown: $("shown"),
    ahead: $("ahead"),
    clock: $("clock"),
    time: $("time"),
    canvas: $("screen"),
    audio: $("audio"),
  };
  const ctx = ui.canvas.getContext("2d");
  const params = new URLSearchParams(location.search);

  const PREBUFFER_S = 0.5; // frames ahead of the clock before playback starts (or the whole stream)
  const STALL_S = 0.1; // the clock this far past the newest frame while the stream runs: pause and buffer
  const RESUME_S = 0.5; // ... until this much is buffered again
  const AUDIO_STALL_MS = 1500; // audio "playing" but its time not moving for this long: use the wall clock

  let clip = null; // {blob, name}
  let current = null; // the Run being played
  let audioUrl = null;

  function setStatus(text, state) {
    ui.status.textContent = text;
    if (state) {
      ui.status.dataset.state = state;
      ui.canvas.dataset.state = state;
      document.body.dataset.state = state;
    }
    ui.status.classList.toggle("error", state === "error");
  }

  const fromBase64 = Uint8Array.fromBase64
    ? (text) => Uint8Array.fromBase64(text)
    : (text) => {
        const binary = atob(text);
        const bytes = new Uint8Array(binary.length);
        for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
        return bytes;
      };

  // -- clocks ------------------------------------------------------------------

  class WallClock {
    constructor(at, label) {
      this.base = at;
      this.t0 = null;
      this.label = label;
    }
    start() {
      if (this.t0 === null) this.t0 = performance.now();
    }
    pause() {
      if (this.t0 !== null) {
        this.base = this.now();
        this.t0 = null;
      }
    }
    now() {
      return this.t0 === null ? this.base : this.base + (performance.now() - this.t0) / 1000;
    }
  }

  class AudioClock {
    constructor(audio, onFail) {
      this.audio = audio;
      this.onFail = onFail; // (reason, time) => switch to a wall clock at that time
      this.label = "audio";
      this.wanted = false;
      this.lastTime = -1;
      this.lastChange = 0;
    }
    start() {
      this.wanted = true;
      this.lastChange = performance.now();
      const playing = this.audio.play();
      if (playing) playing.catch((err) => this.wanted && this.onFail(`audio refused: ${err.name}`, this.audio.currentTime));
    }
    pause() {
      this.wanted = false;
      this.audio.pause();
    }
    now() {
      const t = this.audio.currentTime;
      if (this.wanted) {
        const now = performance.now();
        if (t !== this.lastTime) {
          this.lastTime = t;
          this.lastChange = now;
        } else if (now - this.lastChange > AUDIO_STALL_MS) {
          this.onFail("audio not advancing", t);
        }
      }
      return t;
    }
  }

  // -- a playback run ----------------------------------------------------------

  class Run {
    constructor(blob, model, startFrame) {
      this.blob = blob;
      this.model = model;
      this.startFrame = startFrame;
      this.abort = new AbortController();
      this.frames = []; // {index, t, blob}, in order; frames before `head` were shown or skipped
      this.head = 0;
      this.received = 0;
      this.shown = 0;
      this.shownIndex = -1;
      this.lastIndex = -1;
      this.lastT = -Infinity;
      this.streamEnded = false;
      this.ended = null;
      this.info = null;
      this.clock = null;
      this.playing = false;
      this.decoding = false;
      this.finished = false;
      this.audioUsable = true;
      this.began = performance.now();
    }
  }

  function stopRun(run) {
    if (!run) return;
    run.finished = true;
    run.abort.abort();
    if (run.clock) run.clock.pause();
    ui.audio.pause();
    ui.stop.disabled = true;
    ui.play.disabled = !clip || !ui.model.value;
  }

  function fail(run, message) {
    if (run !== current || run.finished) return;
    stopRun(run);
    setStatus(message, "error");
  }

  function finish(run) {
    stopRun(run);
    const wall = run.ended ? `, rendered in ${run.ended.wall_seconds.toFixed(2)} s` : "";
    setStatus(`done: ${run.shown} frames shown of ${run.received} received (clock: ${run.clock.label}${wall})`, "done");
  }

  function switchToWallClock(run, reason, at) {
    if (run !== current || !(run.clock instanceof AudioClock)) return;
    run.clock.pause();
    const clock = new WallClock(Number.isFinite(at) ? at : 0, `wall (${reason})`);
    if (run.playing) clock.start();
    run.clock = clock;
  }

  function startPlayback(run) {
    if (run.audioUsable) {
      run.clock = new AudioClock(ui.audio, (reason, at) => switchToWallClock(run, reason, at));
      ui.audio.currentTime = 0;
    } else {
      run.clock = new WallClock(0, "wall (audio cannot play)");
    }
    run.clock.start();
    run.playing = true;
    setStatus("playing", "playing");
  }

  async function startRun() {
    if (!clip || !ui.model.value) return;
    stopRun(current);
    const run = new Run(clip.blob, ui.model.value, Math.max(0, parseInt(ui.startFrame.value, 10) || 0));
    current = run;
    ui.play.disabled = true;
    ui.stop.disabled = false;
    ui.canvas.dataset.framesShown = "0";
    ui.canvas.dataset.framesReceived = "0";
    if (audioUrl) URL.revokeObjectURL(audioUrl);
    audioUrl = URL.createObjectURL(run.blob);
    ui.audio.onerror = () => {
      run.audioUsable = false;
      switchToWallClock(run, "audio cannot play", ui.audio.currentTime);
    };
    ui.audio.onended = () => switchToWallClock(run, "audio ended", ui.audio.currentTime);
    ui.audio.src = audioUrl;
    ui.audio.load();
    setStatus("uploading…", "loading");
    requestAnimationFrame(tick);
    await readStream(run);
  }

  // -- the frame stream ----------------------------------------------------------

  async function readStream(run) {
    const url = `/session?model=${encodeURIComponent(run.model)}&start_frame=${run.startFrame}`;
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        body: run.blob,
        headers: { "Content-Type": run.blob.type || "application/octet-stream" },
        signal: run.abort.signal,
      });
    } catch (err) {
      if (!run.abort.signal.aborted) fail(run, `upload failed: ${err.message}`);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (!run.abort.signal.aborted) fail(run, `the stream broke: ${err.message}`);
        return;
      }
      if (chunk.done) break;
      let from = buffer.length;
      buffer += decoder.decode(chunk.value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n", from)) >= 0) {
        const text = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        from = 0;
        if (text.trim()) handleLine(run, text);
        if (run.finished) {
          run.abort.abort();
          return;
        }
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) handleLine(run, buffer);
    if (!run.streamEnded) fail(run, response.ok ? "the stream ended early" : `HTTP ${response.status}`);
  }

  function handleLine(run, text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      fail(run, `the gateway sent a line that is not JSON (${err.message})`);
      return;
    }
    if (msg.error !== undefined) {
      fail(run, `${msg.code || "ERROR"}: ${msg.error}`);
    } else if (msg.started) {
      run.info = msg.started;
      if (ui.canvas.width !== msg.started.width || ui.canvas.height !== msg.started.height) {
        ui.canvas.width = msg.started.width;
        ui.canvas.height = msg.started.height;
        ui.canvas.style.aspectRatio = `${msg.started.width} / ${msg.started.height}`;
      }
      setStatus(`rendering ${msg.started.audio_seconds.toFixed(2)} s of audio…`, "buffering");
    } else if (msg.ended) {
      run.streamEnded = true;
      run.ended = msg.ended;
    } else if (msg.jpeg !== undefined) {
      run.frames.push({ index: msg.index, t: msg.t, blob: new Blob([fromBase64(msg.jpeg)], { type: "image/jpeg" }) });
      run.received += 1;
      run.lastIndex = msg.index;
      run.lastT = msg.t;
      ui.canvas.dataset.framesReceived = String(run.received);
    }
  }

  // -- drawing -------------------------------------------------------------------

  function draw(run, i) {
    const frame = run.frames[i];
    run.head = i + 1;
    run.decoding = true;
    createImageBitmap(frame.blob)
      .then((bitmap) => {
        if (run === current) {
          ctx.drawImage(bitmap, 0, 0, ui.canvas.width, ui.canvas.height);
          run.shown += 1;
          run.shownIndex = frame.index;
          ui.canvas.dataset.framesShown = String(run.shown);
          ui.canvas.dataset.shownT = String(frame.t); // the timestamp on screen, for tests and tools
        }
        bitmap.close();
      })
      .catch((err) => fail(run, `frame ${frame.index}: cannot decode the JPEG (${err.message})`))
      .finally(() => {
        run.decoding = false;
      });
    if (run.head > 256) {
      // forget frames already passed
      run.frames = run.frames.slice(run.head);
      run.head = 0;
    }
  }

  function tick() {
    const run = current;
    if (!run || run.finished) return;
    if (run.streamEnded && run.received === 0) {
      stopRun(run);
      setStatus("done: the session returned no frames", "done");
      return;
    }
    if (!run.clock && run.received > 0 && (run.streamEnded || run.lastT >= PREBUFFER_S)) startPlayback(run);
    let t = 0;
    if (run.clock) {
      t = run.clock.now();
      if (!run.streamEnded && run.playing && t > run.lastT + STALL_S) {
        run.clock.pause();
        run.playing = false;
        setStatus("buffering…", "buffering");
      } else if (!run.playing && (run.streamEnded || run.lastT >= t + RESUME_S)) {
        run.clock.start();
        run.playing = true;
        setStatus("playing", "playing");
      }
      if (!run.decoding) {
        let pick = -1;
        for (let i = run.head; i < run.frames.length && run.frames[i].t <= t + 1e-6; i++) pick = i;
        if (pick >= 0) draw(run, pick);
      }
      if (run.streamEnded && !run.decoding && run.head >= run.frames.length && run.shownIndex === run.lastIndex) {
        finish(run);
      }
    }
    ui.received.textContent = String(run.received);
    ui.shown.textContent = String(run.shown);
    ui.ahead.textContent = `${Math.max(0, run.received ? run.lastT - t : 0).toFixed(1)} s`;
    ui.clock.textContent = run.clock ? run.clock.label : "–";
    ui.time.textContent = `${t.toFixed(2)} s`;
    ui.canvas.dataset.clockT = t.toFixed(3);
    ui.canvas.dataset.clock = run.clock ? run.clock.label : "";
    if (!run.finished) requestAnimationFrame(tick);
  }

  // -- choosing a clip -------------------------------------------------------------

  function setClip(blob, name) {
    clip = { blob, name };
    ui.clipInfo.textContent = `clip: ${name} (${(blob.size / 1024).toFixed(0)} KB${blob.type ? `, ${blob.type}` : ""})`;
    ui.play.disabled = !ui.model.value || (current && !current.finished);
  }

  async function fetchClip(url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    setClip(await response.blob(), url);
  }

  ui.file.addEventListener("change", () => {
    if (ui.file.files.length) setClip(ui.file.files[0], ui.file.files[0].name);
  });
  ui.play.addEventListener("click", startRun);
  ui.stop.addEventListener("click", () => {
    if (current && !current.finished) {
      stopRun(current);
      setStatus("stopped", "stopped");
    }
  });
  ui.sample.addEventListener("click", () => fetchClip("/sample-clip").catch((err) => setStatus(err.message, "error")));

  let recorder = null;
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder) {
    ui.record.hidden = false;
    ui.record.addEventListener("click", async () => {
      if (recorder) {
        recorder.stop();
        return;
      }
      let stream;
      try {
        stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      } catch (err) {
        setStatus(`microphone: ${err.message}`, "error");
        return;
      }
      const types = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];
      const type = types.find((t) => MediaRecorder.isTypeSupported(t)) || "";
      const parts = [];
      const began = performance.now();
      recorder = new MediaRecorder(stream, type ? { mimeType: type } : undefined);
      recorder.addEventListener("dataavailable", (event) => event.data.size && parts.push(event.data));
      recorder.addEventListener("stop", () => {
        stream.getTracks().forEach((track) => track.stop());
        const blob = new Blob(parts, { type: recorder.mimeType || type || "audio/webm" });
        recorder = null;
        ui.record.textContent = "Record";
        ui.record.classList.remove("recording");
        setClip(blob, `recording, ${((performance.now() - began) / 1000).toFixed(1)} s`);
        setStatus("recorded: press Play", "idle");
      });
      recorder.start(250);
      ui.record.textContent = "Stop recording";
      ui.record.classList.add("recording");
      setStatus("recording… press Stop recording when done", "recording");
    });
  }

  // -- start-up ----------------------------------------------------------------------

  async function loadModels() {
    const response = await fetch("/models");
    const body = await response.json();
    if (!response.ok) throw new Error(`models: ${body.code || response.status}: ${body.error || ""}`);
    ui.model.replaceChildren();
    for (const m of body) {
      const option = new Option(`${m.model_id} (${m.frame_width}x${m.frame_height})`, m.model_id);
      ui.model.append(option);
    }
    const wanted = params.get("model");
    if (wanted) {
      if (!body.some((m) => m.model_id === wanted)) ui.model.append(new Option(wanted, wanted));
      ui.model.value = wanted;
    }
    if (!body.length && !wanted) throw new Error("the compositing service has no models");
  }

  async function init() {
    if (params.get("start_frame")) ui.startFrame.value = params.get("start_frame");
    try {
      const health = await (await fetch("/healthz")).json();
      ui.sample.hidden = !health.sample_clip;
      await loadModels();
      const clipUrl = params.get("clip");
      if (clipUrl) {
        // Same origin only: a path on this gateway such as /sample-clip.
        if (!clipUrl.startsWith("/") || clipUrl.startsWith("//")) throw new Error("clip: expected a path like /sample-clip");
        await fetchClip(clipUrl);
      }
      setStatus(clip ? "ready: press Play" : "choose a clip, then press Play", "idle");
      ui.play.disabled = !clip || !ui.model.value;
      if (params.get("autoplay") === "1" && clip) await startRun();
    } catch (err) {
      setStatus(err.message, "error");
    }
  }

  init();
})();
