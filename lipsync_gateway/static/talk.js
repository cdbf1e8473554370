// Talk mode: the microphone goes to the gateway over WebRTC (POST /offer) and the avatar's live video and voice
// come back. The data channel brings per-frame stats: when the audio a frame shows reached the gateway
// (audio_at) and when the frame was sent (sent_at), keyed by its RTP timestamp; requestVideoFrameCallback says
// when the frame was handed to the compositor here, so speech -> frame latency = that time - audio_at, with
// the clock offset to the gateway measured by ping/pong.
//
// Query string: ?talk=1&model=ID starts at once (for tests). window.lipsyncTalk exposes the live figures.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    talk: $("talk"),
    interrupt: $("interrupt"),
    hear: $("hear"),
    model: $("model"),
    status: $("status"),
    stats: $("talk-stats"),
    lat50: $("lat50"),
    lat95: $("lat95"),
    decoded: $("decoded"),
    fps: $("talk-fps"),
    av: $("av-offset"),
    video: $("remote"),
    canvas: $("screen"),
  };
  const params = new URLSearchParams(location.search);
  const KEEP = 600; // frames of stats kept (24 s)
  let call = null;

  function setStatus(text, state) {
    ui.status.textContent = text;
    ui.status.dataset.state = state;
    ui.video.dataset.state = state;
    ui.status.classList.toggle("error", state === "error");
  }

  function percentile(values, p) {
    if (!values.length) return null;
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
  }

  class Call {
    constructor() {
      this.pc = null;
      this.dc = null;
      this.mic = null;
      this.peerId = null;
      this.frames = new Map(); // RTP timestamp -> the frame's stats from the gateway
      this.latencies = []; // ms, speech frames shown
      this.decoded = 0; // requestVideoFrameCallback calls
      this.offset = 0; // gateway clock - ours, ms
      this.bestRtt = Infinity;
      this.avOffsets = []; // ms, audio minus video estimatedPlayoutTimestamp
      this.framesDecoded = 0; // from getStats
      this.closed = false;
      this.timers = [];
    }
  }

  function onMessage(c, event) {
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return;
    }
    if (msg.type === "frame" && msg.rtp !== undefined) {
      c.frames.set(msg.rtp, msg);
      if (c.frames.size > KEEP) c.frames.delete(c.frames.keys().next().value);
    } else if (msg.type === "pong") {
      const now = performance.timeOrigin + performance.now();
      const rtt = now - msg.t;
      if (rtt < c.bestRtt) {
        c.bestRtt = rtt;
        c.offset = msg.server_time - (msg.t + now) / 2;
      }
    } else if (msg.type === "error") {
      setStatus(`${msg.code}: ${msg.error}`, "error");
    }
  }

  function onVideoFrame(c, now, meta) {
    if (c.closed) return;
    c.decoded += 1;
    const info = c.frames.get(meta.rtpTimestamp);
    if (info && info.audio_at) {
      const shown = performance.timeOrigin + meta.presentationTime + c.offset;
      c.latencies.push(shown - info.audio_at);
      if (c.latencies.length > KEEP) c.latencies.shift();
    }
    ui.video.requestVideoFrameCallback((t, m) => onVideoFrame(c, t, m));
  }

  async function poll(c) {
    if (c.closed) return;
    if (c.dc && c.dc.readyState === "open") c.dc.send(JSON.stringify({ type: "ping", t: performance.timeOrigin + performance.now() }));
    const report = await c.pc.getStats();
    let audio = null;
    let video = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") audio = s;
      if (s.type === "inbound-rtp" && s.kind === "video") video = s;
    });
    if (video) {
      c.framesDecoded = video.framesDecoded || 0;
      ui.fps.textContent = video.framesPerSecond ? video.framesPerSecond.toFixed(0) : "–";
    }
    if (audio && video && audio.estimatedPlayoutTimestamp && video.estimatedPlayoutTimestamp) {
      const offset = audio.estimatedPlayoutTimestamp - video.estimatedPlayoutTimestamp;
      c.avOffsets.push(offset);
      if (c.avOffsets.length > 120) c.avOffsets.shift();
      ui.av.textContent = `${offset.toFixed(0)} ms`;
    }
    const p50 = percentile(c.latencies, 50);
    const p95 = percentile(c.latencies, 95);
    ui.lat50.textContent = p50 === null ? "–" : `${p50.toFixed(0)} ms`;
    ui.lat95.textContent = p95 === null ? "–" : `${p95.toFixed(0)} ms`;
    ui.decoded.textContent = String(c.decoded);
  }

  function gathered(pc, timeoutMs) {
    // The gateway answers once, with its candidates; ours go in the offer, so wait for gathering (bounded).
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => pc.iceGatheringState === "complete" && resolve();
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, timeoutMs);
    });
  }

  async function start() {
    if (call) return;
    const model = ui.model.value;
    if (!model) return setStatus("choose a model first", "error");
    const c = new Call();
    call = c;
    window.lipsyncTalk = c;
    ui.talk.textContent = "Hang up";
    ui.talk.classList.add("live");
    setStatus("asking for the microphone…", "connecting");
    try {
      const health = await (await fetch("/healthz")).json();
      const iceServers = (health.peers && health.peers.ice_servers) || [];
      // Raw level: the model opens the mouth with loudness, so no gain control or noise gate in between.
      c.mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: false },
      });
      const pc = new RTCPeerConnection({ iceServers });
      c.pc = pc;
      c.mic.getTracks().forEach((track) => pc.addTrack(track, c.mic));
      pc.addTransceiver("video", { direction: "recvonly" });
      c.dc = pc.createDataChannel("lipsync");
      c.dc.onmessage = (event) => onMessage(c, event);
      const remote = new MediaStream();
      pc.ontrack = (event) => {
        remote.addTrack(event.track);
        ui.video.srcObject = remote;
      };
      pc.onconnectionstatechange = () => {
        const state = pc.connectionState;
        if (state === "connected") setStatus("talking: speak, the avatar follows", "talking");
        else if (state === "failed" || state === "closed") stop(`connection ${state}`);
      };
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc, 3000);
      setStatus("connecting…", "connecting");
      const response = await fetch("/offer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", model }),
      });
      const answer = await response.json();
      if (!response.ok) throw new Error(`${answer.code || response.status}: ${answer.error || ""}`);
      c.peerId = answer.peer_id;
      ui.video.dataset.peerId = answer.peer_id;
      await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
      ui.canvas.hidden = true;
      ui.video.hidden = false;
      ui.stats.hidden = false;
      ui.interrupt.disabled = false;
      ui.video.muted = !ui.hear.checked;
      ui.video.requestVideoFrameCallback((t, m) => onVideoFrame(c, t, m));
      c.timers.push(setInterval(() => poll(c).catch(() => {}), 500));
    } catch (err) {
      stop();
      setStatus(`talk: ${err.message}`, "error");
    }
  }

  function stop(reason) {
    const c = call;
    if (!c) return;
    call = null;
    c.closed = true;
    c.timers.forEach(clearInterval);
    if (c.pc) c.pc.close();
    if (c.mic) c.mic.getTracks().forEach((track) => track.stop());
    ui.video.srcObject = null;
    ui.video.hidden = true;
    ui.canvas.hidden = false;
    ui.interrupt.disabled = true;
    ui.talk.textContent = "Talk";
    ui.talk.classList.remove("live");
    if (reason) setStatus(`talk ended: ${reason}`, "done");
    else if (ui.status.dataset.state !== "error") setStatus("talk ended", "done");
  }

  ui.talk.addEventListener("click", () => (call ? stop() : start()));
  ui.interrupt.addEventListener("click", () => call && call.dc && call.dc.send(JSON.stringify({ type: "interrupt" })));
  ui.hear.addEventListener("change", () => {
    ui.video.muted = !ui.hear.checked;
  });
  window.addEventListener("pagehide", () => stop());

  if (!window.RTCPeerConnection || !navigator.mediaDevices) ui.talk.hidden = true;
  if (params.get("talk") === "1") {
    // viewer.js fills the model list first
    const wait = () => (ui.model.value && ui.model.value !== "" ? start() : setTimeout(wait, 100));
    wait();
  }
})();
