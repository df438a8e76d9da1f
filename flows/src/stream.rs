//! Streaming sessions: a stateful model run chunk by chunk.
//!
//! A recurrent model exported to ONNX takes its state as inputs and returns the next state
//! as outputs (silero VAD's `h`/`c` → `hn`/`cn`, an LSTM's hidden and cell state). A
//! [`Stream`] carries those outputs into the next chunk's inputs, starting from zeros (or
//! the app's initial values) and again after [`Stream::reset`]. Models that look at a
//! sliding window get a context too: with [`StreamOptions::context`] each chunk is prefixed,
//! along its last axis, with the last samples the model saw in the previous chunk — zeros
//! before the first — so the app pushes only new samples (silero VAD: 512 new samples, 64
//! of context).

use std::sync::Arc;

use tern::{DType, Dim, Outputs, Session, Tensor, TensorInfo};

use crate::error::{Error, Result};
use crate::rows::{concat_last, tail_last};

/// What a [`Stream`] carries between chunks. Build with [`StreamOptions::new`] and the
/// builder methods; checked against the session by [`Stream::new`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct StreamOptions {
    carries: Vec<(String, String)>,
    initial: Vec<(String, Tensor)>,
    contexts: Vec<(String, usize)>,
}

impl StreamOptions {
    /// No state: add pairs with [`StreamOptions::carry`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The output `output` of one chunk is the input `input` of the next.
    pub fn carry(mut self, output: impl Into<String>, input: impl Into<String>) -> Self {
        self.carries.push((output.into(), input.into()));
        self
    }

    /// The value the carried input `input` starts from (and returns to on reset); by
    /// default zeros of its declared shape, which must then be fixed.
    pub fn initial(mut self, input: impl Into<String>, value: Tensor) -> Self {
        self.initial.push((input.into(), value));
        self
    }

    /// Each chunk of `input` is prefixed along its last axis with the last `len` elements of
    /// what the model saw for that input in the previous chunk (zeros for the first).
    pub fn context(mut self, input: impl Into<String>, len: usize) -> Self {
        self.contexts.push((input.into(), len));
        self
    }
}

/// A state pair, checked.
#[derive(Debug)]
struct Carry {
    output: String,
    input: String,
    initial: Tensor,
}

/// A context input, checked.
#[derive(Debug)]
struct Context {
    input: String,
    len: usize,
    dtype: DType,
}

/// A stateful model run chunk by chunk (see the module docs). One stream is one sequence:
/// it is `Send` and used from one thread at a time (`&mut self`); run several streams over
/// one shared session for several sequences.
#[derive(Debug)]
pub struct Stream {
    session: Arc<Session>,
    carries: Vec<Carry>,
    contexts: Vec<Context>,
    /// The carried values, one per carry.
    state: Vec<Tensor>,
    /// The context each context input starts its next chunk with (`None`: zeros).
    tails: Vec<Option<Tensor>>,
    chunks: u64,
}

impl Stream {
    /// Checks `options` against the session's inputs and outputs: every carried output and
    /// input exists, their element types agree, the initial value fits the input, no input
    /// is both carried and given a context.
    pub fn new(session: Arc<Session>, options: StreamOptions) -> Result<Stream> {
        let inputs = session.inputs();
        let outputs = session.outputs();
        let mut carries = Vec::new();
        for (output, input) in &options.carries {
            let bad = |reason: String| Error::BadState {
                output: output.clone(),
                input: input.clone(),
                reason,
            };
            let out = outputs
                .iter()
                .find(|o| &o.name == output)
                .ok_or_else(|| bad(format!("the model has no output {output:?}")))?;
            let inp = inputs
                .iter()
                .find(|i| &i.name == input)
                .ok_or_else(|| bad(format!("the model has no input {input:?}")))?;
            if carries.iter().any(|c: &Carry| &c.input == input) {
                return Err(bad(format!("input {input:?} is carried twice")));
            }
            if let (Some(o), Some(i)) = (out.dtype, inp.dtype) {
                if o != i {
                    return Err(bad(format!("the output is {o}, the input {i}")));
                }
            }
            if let (Some(o), Some(i)) = (&out.shape, &inp.shape) {
                if !could_fit(o, i) {
                    return Err(bad(format!(
                        "the output's shape {} cannot fill the input's {}",
                        out.shape_string(),
                        inp.shape_string()
                    )));
                }
            }
            let given = options.initial.iter().find(|(n, _)| n == input);
            let initial = match given {
                Some((_, value)) => {
                    check_initial(inp, value).map_err(bad)?;
                    value.clone()
                }
                None => zeros_of(inp).map_err(bad)?,
            };
            carries.push(Carry {
                output: output.clone(),
                input: input.clone(),
                initial,
            });
        }
        if let Some((name, _)) = options
            .initial
            .iter()
            .find(|(n, _)| !carries.iter().any(|c| &c.input == n))
        {
            return Err(Error::BadState {
                output: String::new(),
                input: name.clone(),
                reason: "an initial value for an input no output is carried into".into(),
            });
        }
        let mut contexts = Vec::new();
        for (input, len) in &options.contexts {
            let bad = |reason: String| Error::BadChunk {
                input: input.clone(),
                reason,
            };
            let inp = inputs
                .iter()
                .find(|i| &i.name == input)
                .ok_or_else(|| bad("the model has no such input".into()))?;
            if carries.iter().any(|c| &c.input == input) {
                return Err(bad(
                    "the input is carried state; it cannot have a context".into()
                ));
            }
            if contexts.iter().any(|c: &Context| &c.input == input) {
                return Err(bad("two contexts for one input".into()));
            }
            if *len == 0 {
                return Err(bad("a context of 0 elements".into()));
            }
            let dtype = inp
                .dtype
                .filter(|d| d.size_of().is_some())
                .ok_or_else(|| bad("only numeric inputs can have a context".into()))?;
            if inp.shape.as_ref().is_some_and(|s| s.is_empty()) {
                return Err(bad("a scalar input has no axis to prefix".into()));
            }
            contexts.push(Context {
                input: input.clone(),
                len: *len,
                dtype,
            });
        }
        let state = carries.iter().map(|c| c.initial.clone()).collect();
        let tails = vec![None; contexts.len()];
        Ok(Stream {
            session,
            carries,
            contexts,
            state,
            tails,
            chunks: 0,
        })
    }

    /// Runs one chunk: `inputs` are the model's inputs except the carried ones (context
    /// inputs carry only the new elements). On success the carried outputs become the next
    /// chunk's state and all outputs are returned; on failure the stream is left as it was.
    pub fn push<I, S>(&mut self, inputs: I) -> Result<Outputs>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: AsRef<str>,
    {
        let mut feed: Vec<(String, Tensor)> = Vec::new();
        let mut seen = vec![None; self.contexts.len()];
        for (name, tensor) in inputs {
            let name = name.as_ref();
            if let Some(c) = self.carries.iter().find(|c| c.input == name) {
                return Err(Error::BadChunk {
                    input: name.to_string(),
                    reason: format!("it is carried from output {:?}; do not pass it", c.output),
                });
            }
            let tensor = match self.contexts.iter().position(|c| c.input == name) {
                Some(ix) => {
                    let full = self.prefix(ix, &tensor)?;
                    seen[ix] = Some(full.clone());
                    full
                }
                None => tensor,
            };
            feed.push((name.to_string(), tensor));
        }
        for (carry, value) in self.carries.iter().zip(&self.state) {
            feed.push((carry.input.clone(), value.clone()));
        }
        let outputs = self.session.run(feed)?;
        let mut next = Vec::with_capacity(self.carries.len());
        for carry in &self.carries {
            let value = outputs.get(&carry.output).ok_or_else(|| Error::BadState {
                output: carry.output.clone(),
                input: carry.input.clone(),
                reason: "the run returned no such output".into(),
            })?;
            next.push(value.clone());
        }
        let mut tails = Vec::with_capacity(self.contexts.len());
        for (c, full) in self.contexts.iter().zip(&seen) {
            tails.push(match full {
                Some(full) => Some(tail_last(full, c.len)?),
                None => None,
            });
        }
        self.state = next;
        for (slot, tail) in self.tails.iter_mut().zip(tails) {
            if tail.is_some() {
                *slot = tail;
            }
        }
        self.chunks += 1;
        Ok(outputs)
    }

    /// `chunk` prefixed with context `ix`'s tail (zeros when there is none yet).
    fn prefix(&self, ix: usize, chunk: &Tensor) -> Result<Tensor> {
        let c = &self.contexts[ix];
        let bad = |reason: String| Error::BadChunk {
            input: c.input.clone(),
            reason,
        };
        if chunk.dtype() != c.dtype {
            return Err(bad(format!("must be {}, got {}", c.dtype, chunk.dtype())));
        }
        let Some((_, leading)) = chunk.shape().split_last() else {
            return Err(bad("a scalar chunk has no axis to prefix".into()));
        };
        let tail = match &self.tails[ix] {
            Some(tail) if &tail.shape()[..tail.shape().len() - 1] == leading => tail.clone(),
            Some(tail) => {
                return Err(bad(format!(
                    "shape {:?} does not continue the previous chunk (its context is {:?})",
                    chunk.shape(),
                    tail.shape()
                )))
            }
            None => {
                let mut shape = leading.to_vec();
                shape.push(c.len);
                Tensor::zeros(c.dtype, &shape)?
            }
        };
        Ok(concat_last(&tail, chunk)?)
    }

    /// Starts over: the state back to its initial values, the contexts to zeros.
    pub fn reset(&mut self) {
        self.state = self.carries.iter().map(|c| c.initial.clone()).collect();
        self.tails.iter_mut().for_each(|t| *t = None);
        self.chunks = 0;
    }

    /// How many chunks ran since the stream started or was reset.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The state the next chunk will be given, as `(input name, value)` pairs.
    pub fn state(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.carries
            .iter()
            .map(|c| c.input.as_str())
            .zip(&self.state)
    }

    /// The session the stream runs on.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

/// Whether an output of declared shape `output` can be an input of declared shape `input`:
/// same rank, and no two fixed sizes that differ.
fn could_fit(output: &[Dim], input: &[Dim]) -> bool {
    output.len() == input.len()
        && output.iter().zip(input).all(|pair| match pair {
            (Dim::Fixed(a), Dim::Fixed(b)) => a == b,
            _ => true,
        })
}

/// Zeros of `input`'s declared shape, which must be fixed.
fn zeros_of(input: &TensorInfo) -> std::result::Result<Tensor, String> {
    let dtype = input.dtype.ok_or_else(|| {
        "the input's element type is not declared; give an initial value".to_string()
    })?;
    let shape = input
        .shape
        .as_ref()
        .ok_or_else(|| "the input's shape is not declared; give an initial value".to_string())?
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Ok(*n),
            Dim::Symbolic(s) => Err(format!(
                "the input's shape {} has the free dimension {s}; give an initial value",
                input.shape_string()
            )),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Tensor::zeros(dtype, &shape).map_err(|e| e.to_string())
}

/// Checks an app-given initial value against the input's declared dtype and fixed sizes.
fn check_initial(input: &TensorInfo, value: &Tensor) -> std::result::Result<(), String> {
    if let Some(dtype) = input.dtype {
        if value.dtype() != dtype {
            return Err(format!(
                "initial value is {}, the input {dtype}",
                value.dtype()
            ));
        }
    }
    if !input.accepts(value.shape()) {
        return Err(format!(
            "initial value of shape {:?} does not fit the input's {}",
            value.shape(),
            input.shape_string()
        ));
    }
    Ok(())
}
