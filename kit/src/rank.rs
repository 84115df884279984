//! Which part of the work this process does: rank and world size.
//!
//! Resolution order (first that applies wins):
//! 1. `--rank` / `--world` flags;
//! 2. a Slurm job array: `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT` (the rank
//!    is the task id minus `SLURM_ARRAY_TASK_MIN`, so `--array=1-8` works too);
//! 3. a Kubernetes Indexed Job: `JOB_COMPLETION_INDEX`, with the world from `--world`
//!    (the Job's `completions`; Kubernetes does not expose it);
//! 4. torchrun and friends: `RANK` / `WORLD_SIZE`;
//! 5. otherwise rank 0 of 1.
//!
//! Shard `i` belongs to rank `i % world`.

/// This process's share of the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank {
    /// 0-based rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Where the values came from (for logs and reports).
    pub origin: &'static str,
}

impl Rank {
    /// Whether shard `index` is this rank's.
    pub fn owns(&self, index: usize) -> bool {
        index % self.world == self.rank
    }
}

/// A rank/world that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rank/world from {origin}: {why}")]
pub struct RankError {
    /// Where the values came from.
    pub origin: &'static str,
    /// What is wrong.
    pub why: String,
}

/// Resolves rank and world from flags and the environment (`env` looks a variable up;
/// pass `|k| std::env::var(k).ok()`).
pub fn resolve(
    flag_rank: Option<usize>,
    flag_world: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Rank, RankError> {
    let num = |k: &str, source: &'static str| -> Result<Option<usize>, RankError> {
        match env(k) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| RankError {
                origin: source,
                why: format!("{k}={v:?} is not a number"),
            }),
        }
    };
    let (rank, world, source) = if flag_rank.is_some() || flag_world.is_some() {
        let source = "--rank/--world";
        match (flag_rank, flag_world) {
            (Some(r), Some(w)) => (r, w, source),
            (Some(_), None) => {
                return Err(RankError {
                    origin: source,
                    why: "--rank needs --world".into(),
                });
            }
            (None, Some(w)) => match num("JOB_COMPLETION_INDEX", "JOB_COMPLETION_INDEX")? {
                Some(r) => (r, w, "JOB_COMPLETION_INDEX + --world"),
                None => {
                    return Err(RankError {
                        origin: source,
                        why: "--world needs --rank (or JOB_COMPLETION_INDEX)".into(),
                    });
                }
            },
            (None, None) => unreachable!(),
        }
    } else if let Some(id) = num("SLURM_ARRAY_TASK_ID", "Slurm")? {
        let source = "Slurm";
        let count = num("SLURM_ARRAY_TASK_COUNT", source)?.ok_or_else(|| RankError {
            origin: source,
            why: "SLURM_ARRAY_TASK_ID without SLURM_ARRAY_TASK_COUNT".into(),
        })?;
        let min = num("SLURM_ARRAY_TASK_MIN", source)?.unwrap_or(0);
        let rank = id.checked_sub(min).ok_or_else(|| RankError {
            origin: source,
            why: format!("task id {id} below SLURM_ARRAY_TASK_MIN {min}"),
        })?;
        (rank, count, source)
    } else if num("JOB_COMPLETION_INDEX", "JOB_COMPLETION_INDEX")?.is_some() {
        return Err(RankError {
            origin: "JOB_COMPLETION_INDEX",
            why: "a Kubernetes Indexed Job also needs --world (the Job's completions)".into(),
        });
    } else if let Some(r) = num("RANK", "RANK/WORLD_SIZE")? {
        let world = num("WORLD_SIZE", "RANK/WORLD_SIZE")?.ok_or_else(|| RankError {
            origin: "RANK/WORLD_SIZE",
            why: "RANK without WORLD_SIZE".into(),
        })?;
        (r, world, "RANK/WORLD_SIZE")
    } else {
        (0, 1, "default")
    };
    if world == 0 || rank >= world {
        return Err(RankError {
            origin: source,
            why: format!("rank {rank} is not in 0..{world}"),
        });
    }
    Ok(Rank {
        rank,
        world,
        origin: source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| v.iter().find(|(n, _)| n == k).map(|(_, x)| x.clone())
    }

    #[test]
    fn resolution_order_and_errors() {
        let none = env(&[]);
        assert_eq!(
            resolve(None, None, &none).unwrap(),
            Rank {
                rank: 0,
                world: 1,
                origin: "default"
            }
        );
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
        ]);
        assert_eq!(
            resolve(None, None, &slurm).unwrap(),
            Rank {
                rank: 4,
                world: 8,
                origin: "Slurm"
            }
        );
        // flags win over everything
        assert_eq!(resolve(Some(1), Some(3), &slurm).unwrap().rank, 1);
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(
            resolve(None, Some(4), &k8s).unwrap(),
            Rank {
                rank: 2,
                world: 4,
                origin: "JOB_COMPLETION_INDEX + --world"
            }
        );
        assert!(
            resolve(None, None, &k8s)
                .unwrap_err()
                .why
                .contains("--world")
        );
        let torch = env(&[("RANK", "3"), ("WORLD_SIZE", "4")]);
        assert_eq!(
            resolve(None, None, &torch).unwrap(),
            Rank {
                rank: 3,
                world: 4,
                origin: "RANK/WORLD_SIZE"
            }
        );
        assert!(
            resolve(Some(4), Some(4), &none)
                .unwrap_err()
                .why
                .contains("not in 0..4")
        );
        assert!(resolve(Some(0), None, &none).is_err());
        let bad = env(&[("RANK", "x"), ("WORLD_SIZE", "2")]);
        assert!(
            resolve(None, None, &bad)
                .unwrap_err()
                .why
                .contains("RANK=\"x\"")
        );
    }

    #[test]
    fn shards_split_round_robin_and_cover_everything_once() {
        let world = 3;
        let mut owners = [0; 10];
        for rank in 0..world {
            let r = Rank {
                rank,
                world,
                origin: "test",
            };
            for (i, o) in owners.iter_mut().enumerate() {
                if r.owns(i) {
                    *o += 1;
                }
            }
        }
        assert!(owners.iter().all(|&n| n == 1));
        assert!(
            Rank {
                rank: 1,
                world: 3,
                origin: "t"
            }
            .owns(4)
        );
    }
}
