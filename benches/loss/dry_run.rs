//! The dry run (`CCPL_BENCH_DRY_RUN=1`): the float64 CPU reference timed under the GPU
//! benches' ids.

use super::rows::reference_rows;
use super::step::{step_centers, step_inputs};
use super::*;

/// The dry run: each group of `cfg` times the float64 CPU reference of its step under the
/// group's own id (the user step draws its centres each step), and says so in its status.
pub fn dry_run<T: Dtype>(c: &mut Criterion, cfg: &Config) -> ccpl::Result<()> {
    let mut rng = Rng::new(20_220_708);
    let unchecked = Check::Unchecked("dry run: the float64 CPU reference itself".into());
    let memory = |workspace, gradients| Memory {
        device: None,
        workspace,
        gradients,
    };
    match &cfg.suite {
        Suite::Step { layers } => {
            let feats: Vec<(Vec<T>, Vec<T>)> = layers
                .iter()
                .map(|(shape, _)| {
                    let mut draw = || rng.vec(shape.len()).into_iter().map(T::from_f64).collect();
                    (draw(), draw())
                })
                .collect();
            let gradients = layers.iter().map(|(s, _)| s.len()).sum::<usize>() * size_of::<T>();
            let one_object = LossPlan::new(layers, Tau::DEFAULT)?
                .workspace()?
                .bytes::<T>();
            let per_layer = layers
                .iter()
                .map(|(s, num_s)| CcpLayer::<T>::workspace_bytes_for(s, (*num_s).min(s.interior())))
                .sum::<ccpl::Result<usize>>()?;
            // Every variant draws new centres each step, as the device sampler does.
            let step = |i: u64| -> ccpl::Result<f64> {
                let centers = step_centers(layers, i)?;
                Ok(ccp_loss(&step_inputs(layers, &feats, centers), Tau::DEFAULT, false)?.0)
            };
            let loss = step(0)?;
            for group in groups_of(cfg) {
                let workspace = if group == LAYERS {
                    per_layer
                } else {
                    one_object
                };
                let mem = memory(workspace, gradients);
                report(&bench_id::<T>(group, cfg), &mem, 1, loss, &unchecked, 0.0);
                time_cpu(c, cfg, group, T::SUFFIX, step);
            }
        }
        &Suite::Layer { shape, num_s } => {
            let q: Vec<T> = rng.vec(shape.len()).into_iter().map(T::from_f64).collect();
            let k: Vec<T> = rng.vec(shape.len()).into_iter().map(T::from_f64).collect();
            let fixed = Centers::sample(shape.height(), shape.width(), num_s, CENTERS_SEED)?;
            let n = fixed.len();
            let mem = memory(
                CcpLayer::<T>::workspace_bytes_for(&shape, n)?,
                shape.len() * size_of::<T>(),
            );
            let loss = ccp_layer_loss(&q, &k, &shape, &fixed, Tau::DEFAULT, false)?.loss;
            for group in groups_of(cfg) {
                report(&bench_id::<T>(group, cfg), &mem, 1, loss, &unchecked, 0.0);
                let user_step = group == USER_STEP;
                time_cpu(c, cfg, group, T::SUFFIX, |i| {
                    let drawn;
                    let centers = if user_step {
                        drawn = Centers::sample(shape.height(), shape.width(), num_s, i)?;
                        &drawn
                    } else {
                        &fixed
                    };
                    Ok(ccp_layer_loss(&q, &k, &shape, centers, Tau::DEFAULT, false)?.loss)
                });
            }
        }
        &Suite::Rows { rows, grad_k } => {
            let round = |v: Vec<f64>| v.into_iter().map(|x| T::from_f64(x).to_f64()).collect();
            let q: Vec<f64> = round(rng.vec(rows.len()));
            let k: Vec<f64> = round(rng.vec(rows.len()));
            let gradients = (1 + usize::from(grad_k)) * rows.len() * size_of::<T>();
            let loss = reference_rows(&q, &k, &rows, grad_k)?.0;
            for group in groups_of(cfg) {
                let workspace = match group {
                    LOSS => CcpRows::<T>::workspace_bytes_for(&rows)?,
                    _ => RowsLoss::<T>::workspace_bytes(&rows),
                };
                let mem = memory(workspace, gradients);
                report(&bench_id::<T>(group, cfg), &mem, 1, loss, &unchecked, 0.0);
                time_cpu(c, cfg, group, T::SUFFIX, |_| {
                    Ok(reference_rows(&q, &k, &rows, grad_k)?.0)
                });
            }
        }
    }
    Ok(())
}
