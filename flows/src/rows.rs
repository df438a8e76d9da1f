//! Tensor surgery the flows need, on row-major bytes: stacking requests along the first
//! axis and splitting the results back ([`concat_rows`], [`split_rows`]), and prefixing a
//! chunk with the end of the previous one along the last axis ([`concat_last`],
//! [`tail_last`]). Strings have no raw bytes and are refused with tern's typed error.

use tern::{Result, Tensor};

/// Bytes per element of `t`.
fn element_size(t: &Tensor) -> Result<usize> {
    t.dtype().size_of().ok_or_else(|| tern::Error::Tensor {
        reason: format!("{} tensors cannot be batched or streamed", t.dtype()),
    })
}

/// The tensors stacked along their first axis (all of one dtype, equal in every other
/// dimension, as the caller has checked).
pub(crate) fn concat_rows(parts: &[&Tensor]) -> Result<Tensor> {
    let first = parts.first().ok_or_else(|| tern::Error::Tensor {
        reason: "nothing to concatenate".into(),
    })?;
    let mut shape = first.shape().to_vec();
    shape[0] = parts.iter().map(|t| t.shape()[0]).sum();
    let mut bytes =
        Vec::with_capacity(parts.iter().map(|t| t.len()).sum::<usize>() * element_size(first)?);
    for part in parts {
        bytes.extend_from_slice(part.as_bytes()?);
    }
    Tensor::from_bytes(first.dtype(), &shape, &bytes)
}

/// `t` cut along its first axis into consecutive pieces of `counts` rows (which must add up
/// to `t`'s first dimension).
pub(crate) fn split_rows(t: &Tensor, counts: &[usize]) -> Result<Vec<Tensor>> {
    let rows = t.shape().first().copied().unwrap_or(0);
    if counts.iter().sum::<usize>() != rows {
        return Err(tern::Error::Tensor {
            reason: format!("cannot split {rows} rows into {counts:?}"),
        });
    }
    let row_bytes = t.shape()[1..].iter().product::<usize>() * element_size(t)?;
    let bytes = t.as_bytes()?;
    let mut start = 0;
    counts
        .iter()
        .map(|&n| {
            let mut shape = t.shape().to_vec();
            shape[0] = n;
            let piece = &bytes[start * row_bytes..(start + n) * row_bytes];
            start += n;
            Tensor::from_bytes(t.dtype(), &shape, piece)
        })
        .collect()
}

/// `head` and `t` joined along their last axis: `[.., a] ++ [.., b] → [.., a + b]` (same
/// dtype and leading dimensions, as the caller has checked).
pub(crate) fn concat_last(head: &Tensor, t: &Tensor) -> Result<Tensor> {
    let size = element_size(t)?;
    let (a, b) = (last(head), last(t));
    let mut shape = t.shape().to_vec();
    if let Some(l) = shape.last_mut() {
        *l = a + b;
    }
    let (hb, tb) = (head.as_bytes()?, t.as_bytes()?);
    let outer = leading(t);
    let mut bytes = Vec::with_capacity(outer * (a + b) * size);
    for row in 0..outer {
        bytes.extend_from_slice(&hb[row * a * size..(row + 1) * a * size]);
        bytes.extend_from_slice(&tb[row * b * size..(row + 1) * b * size]);
    }
    Tensor::from_bytes(t.dtype(), &shape, &bytes)
}

/// The last `n` elements of `t` along its last axis (`n` at most that axis's size).
pub(crate) fn tail_last(t: &Tensor, n: usize) -> Result<Tensor> {
    let size = element_size(t)?;
    let k = last(t);
    if n > k {
        return Err(tern::Error::Tensor {
            reason: format!("cannot take the last {n} of {k} elements"),
        });
    }
    let mut shape = t.shape().to_vec();
    if let Some(l) = shape.last_mut() {
        *l = n;
    }
    let outer = leading(t);
    let tb = t.as_bytes()?;
    let mut bytes = Vec::with_capacity(outer * n * size);
    for row in 0..outer {
        bytes.extend_from_slice(&tb[(row * k + k - n) * size..(row + 1) * k * size]);
    }
    Tensor::from_bytes(t.dtype(), &shape, &bytes)
}

/// The product of every dimension but the last (1 for a scalar or a vector).
fn leading(t: &Tensor) -> usize {
    let shape = t.shape();
    shape[..shape.len().saturating_sub(1)].iter().product()
}

/// The size of the last axis (1 for a scalar).
fn last(t: &Tensor) -> usize {
    t.shape().last().copied().unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_slice(shape, v).unwrap()
    }

    #[test]
    fn rows_round_trip() {
        let a = t(&[1, 3], &[1., 2., 3.]);
        let b = t(&[2, 3], &[4., 5., 6., 7., 8., 9.]);
        let ab = concat_rows(&[&a, &b]).unwrap();
        assert_eq!(ab.shape(), &[3, 3]);
        assert_eq!(
            ab.to_vec::<f32>().unwrap(),
            (1..=9).map(|i| i as f32).collect::<Vec<_>>()
        );
        let parts = split_rows(&ab, &[1, 2]).unwrap();
        assert_eq!(
            parts[0].to_vec::<f32>().unwrap(),
            a.to_vec::<f32>().unwrap()
        );
        assert_eq!(parts[1].shape(), &[2, 3]);
        assert_eq!(
            parts[1].to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap()
        );
        assert!(split_rows(&ab, &[1, 1]).is_err());
    }

    #[test]
    fn last_axis_context() {
        let prev = t(&[2, 4], &[1., 2., 3., 4., 5., 6., 7., 8.]);
        let tail = tail_last(&prev, 2).unwrap();
        assert_eq!(tail.shape(), &[2, 2]);
        assert_eq!(tail.to_vec::<f32>().unwrap(), vec![3., 4., 7., 8.]);
        let chunk = t(&[2, 3], &[9., 10., 11., 12., 13., 14.]);
        let joined = concat_last(&tail, &chunk).unwrap();
        assert_eq!(joined.shape(), &[2, 5]);
        assert_eq!(
            joined.to_vec::<f32>().unwrap(),
            vec![3., 4., 9., 10., 11., 7., 8., 12., 13., 14.]
        );
    }

    #[test]
    fn strings_are_refused() {
        let s = Tensor::from_vec(&[1], vec!["a".to_string()]).unwrap();
        assert!(concat_rows(&[&s]).is_err());
        assert!(tail_last(&s, 0).is_err());
    }
}
