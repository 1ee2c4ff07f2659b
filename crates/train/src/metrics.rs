//! Frechet distance between feature sets, as FID does with Inception features.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::error::{Result, TrainError};

/// Mean and covariance (unbiased) of row vectors.
pub fn mean_cov(rows: &[Vec<f64>]) -> Result<(DVector<f64>, DMatrix<f64>)> {
    let n = rows.len();
    let d = rows.first().map(Vec::len).unwrap_or(0);
    if n < 2 || d == 0 {
        return Err(TrainError::invalid("features", format!("need at least 2 feature rows, got {n}")));
    }
    let x = DMatrix::from_fn(n, d, |i, j| rows[i][j]);
    let mean = DVector::from_fn(d, |j, _| x.column(j).mean());
    let centered = DMatrix::from_fn(n, d, |i, j| x[(i, j)] - mean[j]);
    let cov = centered.transpose() * &centered / (n as f64 - 1.0);
    Ok((mean, cov))
}

fn psd_sqrt(m: &DMatrix<f64>) -> DMatrix<f64> {
    let sym = (m + m.transpose()) * 0.5;
    let eig = SymmetricEigen::new(sym);
    let roots = eig.eigenvalues.map(|v| v.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2).
pub fn frechet_distance(mu1: &DVector<f64>, s1: &DMatrix<f64>, mu2: &DVector<f64>, s2: &DMatrix<f64>) -> f64 {
    let root1 = psd_sqrt(s1);
    let inner = &root1 * s2 * &root1;
    let cross = psd_sqrt(&inner).trace();
    (mu1 - mu2).norm_squared() + s1.trace() + s2.trace() - 2.0 * cross
}

pub fn fd_of_features(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    let (m1, s1) = mean_cov(a)?;
    let (m2, s2) = mean_cov(b)?;
    Ok(frechet_distance(&m1, &s1, &m2, &s2).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_of_a_set_with_itself_is_zero() {
        let rows: Vec<Vec<f64>> =
            (0..50).map(|i| vec![(i as f64).sin(), (i as f64 * 0.7).cos(), i as f64 * 0.01]).collect();
        assert!(fd_of_features(&rows, &rows).unwrap().abs() < 1e-9);
    }

    #[test]
    fn fd_matches_the_gaussian_closed_form() {
        // For commuting covariances FD = |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2 over shared eigenvectors.
        let rot = DMatrix::from_row_slice(2, 2, &[0.6, -0.8, 0.8, 0.6]);
        let s1 = &rot * DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, 4.0])) * rot.transpose();
        let s2 = &rot * DMatrix::from_diagonal(&DVector::from_vec(vec![9.0, 0.25])) * rot.transpose();
        let (m1, m2) = (DVector::from_vec(vec![1.0, 2.0]), DVector::from_vec(vec![-1.0, 2.5]));
        let expected = 4.0 + 0.25 + (1.0f64 - 3.0).powi(2) + (2.0f64 - 0.5).powi(2);
        assert!((frechet_distance(&m1, &s1, &m2, &s2) - expected).abs() < 1e-9);
        assert!(mean_cov(&[vec![1.0]]).is_err());
    }
}
