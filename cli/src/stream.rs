//! `tern stream`: a stateful model over a stream of raw samples (a file or stdin), one JSON
//! line of outputs per chunk — e.g. `sox speech.wav -t f32 -r 16000 -c 1 - | tern stream
//! vad.onnx --chunk input=512 --context input=64 --carry hn=h --carry cn=c --rate 16000`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tern::{DType, Dim, Model, Session, SessionOptions, Tensor};
use tern_flows::{Stream, StreamOptions};

/// Settings of `tern stream`.
pub struct StreamConfig {
    /// Session options.
    pub options: SessionOptions,
    /// `(output, input)` state pairs.
    pub carries: Vec<(String, String)>,
    /// `(input, elements)` contexts.
    pub contexts: Vec<(String, usize)>,
    /// The streamed input.
    pub chunk_input: String,
    /// New elements per chunk along its last axis.
    pub chunk: usize,
    /// Raw little-endian f32 samples; `-` is stdin.
    pub samples: PathBuf,
    /// Inputs given the same value every chunk.
    pub fixed: Vec<(String, Tensor)>,
    /// Samples per second, for the real-time factor.
    pub rate: Option<f64>,
}

/// What `tern stream` did, printed once the stream ends.
#[derive(Debug, Serialize)]
pub struct StreamSummary {
    /// Chunks run.
    pub chunks: u64,
    /// Samples read (before the last chunk's zero padding).
    pub samples: u64,
    /// Seconds of signal, when the rate was given.
    pub seconds: Option<f64>,
    /// Milliseconds spent in the model, all chunks together.
    pub model_ms: f64,
    /// Model time over signal time (below 1: faster than real time), when the rate was given.
    pub real_time_factor: Option<f64>,
}

/// `(name, value)` from `NAME=VALUE`.
pub fn pair(spec: &str, flag: &str) -> Result<(String, String)> {
    let (a, b) = spec
        .split_once('=')
        .with_context(|| format!("{flag} takes A=B, not {spec}"))?;
    Ok((a.to_string(), b.to_string()))
}

/// Streams the samples through the model, writing one JSON line per chunk to `out`.
pub fn stream(
    model: &std::path::Path,
    cfg: StreamConfig,
    out: &mut impl Write,
) -> Result<StreamSummary> {
    anyhow::ensure!(
        cfg.chunk > 0,
        "--chunk needs at least one element per chunk"
    );
    let model = Model::load(model)?;
    let info = model
        .inputs()
        .iter()
        .find(|i| i.name == cfg.chunk_input)
        .with_context(|| format!("--chunk: the model has no input {:?}", cfg.chunk_input))?;
    anyhow::ensure!(
        info.dtype.is_none_or(|d| d == DType::F32),
        "--chunk: input {:?} is {}, and the samples are f32",
        info.name,
        info.dtype.map_or("?", |d| d.name())
    );
    // The chunk's shape: the declared leading dimensions (free ones 1), then the new samples.
    let mut shape: Vec<usize> = match &info.shape {
        Some(dims) if !dims.is_empty() => dims[..dims.len() - 1]
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Symbolic(_) => 1,
            })
            .collect(),
        _ => vec![1],
    };
    shape.push(cfg.chunk);
    let per_chunk: usize = shape.iter().product();
    let session = Arc::new(Session::new(&model, cfg.options)?);
    let mut options = StreamOptions::new();
    for (o, i) in &cfg.carries {
        options = options.carry(o, i);
    }
    for (i, n) in &cfg.contexts {
        options = options.context(i, *n);
    }
    let carried: Vec<&str> = cfg.carries.iter().map(|(o, _)| o.as_str()).collect();
    let mut stream = Stream::new(session, options)?;
    let mut reader: Box<dyn BufRead> = if cfg.samples.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin().lock()))
    } else {
        Box::new(BufReader::new(
            std::fs::File::open(&cfg.samples)
                .with_context(|| format!("opening {}", cfg.samples.display()))?,
        ))
    };
    let mut bytes = vec![0u8; per_chunk * 4];
    let (mut samples, mut model_time) = (0u64, std::time::Duration::ZERO);
    loop {
        let got = read_full(&mut reader, &mut bytes)?;
        if got == 0 {
            break;
        }
        anyhow::ensure!(
            got % 4 == 0,
            "the samples end with {} stray byte(s): raw f32 is 4 bytes a sample",
            got % 4
        );
        bytes[got..].fill(0);
        samples += (got / 4) as u64;
        let chunk = Tensor::from_bytes(DType::F32, &shape, &bytes)?;
        let mut inputs = cfg.fixed.clone();
        inputs.push((cfg.chunk_input.clone(), chunk));
        let t = Instant::now();
        let outputs = stream.push(inputs)?;
        model_time += t.elapsed();
        let mut map = serde_json::Map::new();
        for (name, tensor) in outputs.iter() {
            if !carried.contains(&name) {
                map.insert(name.to_string(), tensor.to_json()?);
            }
        }
        let line = serde_json::json!({
            "chunk": stream.chunks() - 1,
            "padded": per_chunk - got / 4,
            "outputs": map,
        });
        writeln!(out, "{line}")?;
        if got < bytes.len() {
            break;
        }
    }
    out.flush()?;
    let seconds = cfg.rate.map(|r| samples as f64 / r);
    Ok(StreamSummary {
        chunks: stream.chunks(),
        samples,
        seconds,
        model_ms: model_time.as_secs_f64() * 1e3,
        real_time_factor: seconds
            .filter(|s| *s > 0.0)
            .map(|s| model_time.as_secs_f64() / s),
    })
}

/// Fills `buf` from `reader` unless the stream ends first; the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the samples"),
        }
    }
    Ok(got)
}
