//! ParallelDims: the worked examples of the module docs, validation messages, and structural properties of the
//! rank → group mapping over many layouts.

use std::collections::BTreeSet;

use qparallel::dims::{
    DenseCoord, DimsError, DimsProblem, ExpertCoord, GroupKind, ModelShape, ParallelConfig,
    ParallelDims, orthogonal_groups,
};

fn dims(world: usize, cfg: ParallelConfig) -> ParallelDims {
    ParallelDims::new(world, cfg).unwrap_or_else(|e| panic!("{e}"))
}

fn singletons(n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|r| vec![r]).collect()
}

/// Megatron's 16-GPU table: world 16, tp 2, pp 4 ⇒ dp 2.
#[test]
fn megatron_16_gpu_table() {
    let d = dims(
        16,
        ParallelConfig {
            tp: 2,
            pp: 4,
            ..Default::default()
        },
    );
    assert_eq!(
        (d.dp(), d.tp(), d.pp(), d.cp(), d.ep(), d.etp(), d.edp()),
        (2, 2, 4, 1, 1, 2, 2)
    );
    let tp = vec![
        vec![0, 1],
        vec![2, 3],
        vec![4, 5],
        vec![6, 7],
        vec![8, 9],
        vec![10, 11],
        vec![12, 13],
        vec![14, 15],
    ];
    let dp = vec![
        vec![0, 2],
        vec![1, 3],
        vec![4, 6],
        vec![5, 7],
        vec![8, 10],
        vec![9, 11],
        vec![12, 14],
        vec![13, 15],
    ];
    let pp = vec![
        vec![0, 4, 8, 12],
        vec![1, 5, 9, 13],
        vec![2, 6, 10, 14],
        vec![3, 7, 11, 15],
    ];
    assert_eq!(d.groups(GroupKind::Tp), tp);
    assert_eq!(d.groups(GroupKind::Dp), dp);
    assert_eq!(d.groups(GroupKind::Pp), pp);
    assert_eq!(
        d.groups(GroupKind::Embedding),
        vec![vec![0, 12], vec![1, 13], vec![2, 14], vec![3, 15]]
    );
    assert_eq!(
        d.groups(GroupKind::TpPp),
        vec![
            vec![0, 1, 4, 5, 8, 9, 12, 13],
            vec![2, 3, 6, 7, 10, 11, 14, 15]
        ]
    );
    assert_eq!(d.groups(GroupKind::Cp), singletons(16));
    assert_eq!(d.groups(GroupKind::DpCp), dp);
    assert_eq!(d.groups(GroupKind::Etp), tp);
    assert_eq!(d.groups(GroupKind::Ep), singletons(16));
    assert_eq!(d.groups(GroupKind::EtpEp), tp);
    assert_eq!(d.groups(GroupKind::ExpertDp), dp);
    // The coordinate row of the table.
    let row: Vec<(usize, usize, usize)> = (0..16)
        .map(|r| d.coord(r))
        .map(|c| (c.tp, c.dp, c.pp))
        .collect();
    let want: Vec<(usize, usize, usize)> = (0..16).map(|r| (r % 2, (r / 2) % 2, r / 4)).collect();
    assert_eq!(row, want);
    assert!(d.is_first_stage(3) && !d.is_last_stage(3) && d.is_last_stage(13));
    assert_eq!(d.group_of(GroupKind::Embedding, 6), None);
    assert_eq!(d.group_of(GroupKind::Dp, 9), Some(vec![9, 11]));
}

/// The MoE example of the module docs: world 16, tp 2, cp 2, pp 2, ep 2, etp 1 ⇒ dp 2, edp 4.
#[test]
fn moe_folding_table() {
    let d = dims(
        16,
        ParallelConfig {
            tp: 2,
            cp: 2,
            pp: 2,
            ep: 2,
            etp: Some(1),
            ..Default::default()
        },
    );
    assert_eq!((d.dp(), d.edp()), (2, 4));
    let pairs: Vec<Vec<usize>> = (0..8).map(|i| vec![2 * i, 2 * i + 1]).collect();
    assert_eq!(d.groups(GroupKind::Tp), pairs);
    assert_eq!(
        d.groups(GroupKind::Cp),
        vec![
            vec![0, 2],
            vec![1, 3],
            vec![4, 6],
            vec![5, 7],
            vec![8, 10],
            vec![9, 11],
            vec![12, 14],
            vec![13, 15]
        ]
    );
    assert_eq!(
        d.groups(GroupKind::Dp),
        vec![
            vec![0, 4],
            vec![1, 5],
            vec![2, 6],
            vec![3, 7],
            vec![8, 12],
            vec![9, 13],
            vec![10, 14],
            vec![11, 15]
        ]
    );
    let quads = vec![
        vec![0, 2, 4, 6],
        vec![1, 3, 5, 7],
        vec![8, 10, 12, 14],
        vec![9, 11, 13, 15],
    ];
    assert_eq!(d.groups(GroupKind::DpCp), quads);
    assert_eq!(
        d.groups(GroupKind::Pp),
        (0..8).map(|i| vec![i, i + 8]).collect::<Vec<_>>()
    );
    assert_eq!(d.groups(GroupKind::Ep), pairs);
    assert_eq!(d.groups(GroupKind::ExpertDp), quads);
    assert_eq!(d.groups(GroupKind::Etp), singletons(16));
    assert_eq!(d.groups(GroupKind::EtpEp), pairs);
    assert_eq!(
        d.expert_coord(13),
        ExpertCoord {
            etp: 0,
            ep: 1,
            edp: 2,
            pp: 1
        }
    );
    assert_eq!(
        d.coord(13),
        DenseCoord {
            tp: 1,
            cp: 0,
            dp: 1,
            pp: 1
        }
    );
}

#[test]
fn world_error_names_every_factor_and_the_product() {
    let err = ParallelDims::new(
        6,
        ParallelConfig {
            tp: 4,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid parallel layout for world size 6: world size 6 is not divisible by tp(4)·pp(1)·cp(1) = 4"
    );
    let err = ParallelDims::new(
        24,
        ParallelConfig {
            tp: 2,
            pp: 2,
            cp: 4,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("world size 24 is not divisible by tp(2)·pp(2)·cp(4) = 16"),
        "{err}"
    );
}

#[test]
fn all_layout_problems_are_reported_at_once() {
    let err = ParallelDims::new(
        8,
        ParallelConfig {
            tp: 1,
            pp: 1,
            vpp: 2,
            ep: 16,
            sp: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    let DimsError::Layout { world: 8, problems } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        problems,
        &vec![
            DimsProblem::ExpertNotFolding {
                ep: 16,
                etp: 1,
                product: 16,
                dp: 8,
                cp: 1,
                tp: 1,
                dense: 8
            },
            DimsProblem::SpWithoutTp { tp: 1 },
            DimsProblem::VppWithoutPp { vpp: 2, pp: 1 },
        ]
    );
    let msg = err.to_string();
    assert!(
        msg.contains("ep(16)·etp(1) = 16 must divide dp(8)·cp(1)·tp(1) = 8"),
        "{msg}"
    );
    let err = ParallelDims::new(
        0,
        ParallelConfig {
            tp: 0,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid parallel layout for world size 0: world size must be >= 1 (got 0); tp must be >= 1 (got 0)"
    );
}

#[test]
fn expert_folding_rule() {
    // ep·etp must divide dp·cp·tp = 8 here.
    for (ep, etp, ok) in [
        (8, 1, true),
        (4, 2, true),
        (2, 4, true),
        (8, 2, false),
        (3, 1, false),
        (1, 8, true),
    ] {
        let r = ParallelDims::new(
            16,
            ParallelConfig {
                tp: 2,
                pp: 2,
                ep,
                etp: Some(etp),
                ..Default::default()
            },
        );
        assert_eq!(r.is_ok(), ok, "ep {ep} etp {etp}: {r:?}");
    }
}

fn qwen3_8b() -> ModelShape {
    ModelShape {
        heads: 32,
        kv_heads: 8,
        layers: 36,
        experts: 0,
        intermediate_size: 12288,
        moe_intermediate_size: 0,
        seq_len: 4096,
    }
}

#[test]
fn model_validation() {
    let m = qwen3_8b();
    for tp in [1, 2, 4, 8] {
        dims(
            8 * tp,
            ParallelConfig {
                tp,
                sp: tp > 1,
                ..Default::default()
            },
        )
        .validate_model(&m)
        .unwrap();
    }
    // kv heads (8) < tp (16) with tp % kv == 0: replicated, allowed. 32 heads / 16 fine.
    dims(
        16,
        ParallelConfig {
            tp: 16,
            ..Default::default()
        },
    )
    .validate_model(&m)
    .unwrap();
    // kv heads 3 with tp 2: neither divisible nor replicable.
    let bad_kv = ModelShape {
        heads: 6,
        kv_heads: 3,
        ..m
    };
    let err = dims(
        2,
        ParallelConfig {
            tp: 2,
            ..Default::default()
        },
    )
    .validate_model(&bad_kv)
    .unwrap_err();
    assert!(
        matches!(&err, DimsError::Model { problems, .. } if problems == &[DimsProblem::KvHeadsNotDivisible { kv_heads: 3, tp: 2 }]),
        "{err}"
    );
    // kv 3 < tp 4 but 4 % 3 != 0.
    let err = dims(
        4,
        ParallelConfig {
            tp: 4,
            ..Default::default()
        },
    )
    .validate_model(&ModelShape {
        heads: 12,
        kv_heads: 3,
        ..m
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("kv heads 3 do not fit tp(4)"),
        "{err}"
    );

    // Everything wrong at once: heads, layers, experts, seq with cp and sp.
    let d = dims(
        96,
        ParallelConfig {
            tp: 3,
            pp: 4,
            vpp: 2,
            cp: 2,
            ep: 4,
            etp: Some(1),
            sp: true,
        },
    );
    let moe = ModelShape {
        heads: 32,
        kv_heads: 4,
        layers: 36,
        experts: 6,
        intermediate_size: 12288,
        moe_intermediate_size: 768,
        seq_len: 4099,
    };
    let err = d.validate_model(&moe).unwrap_err();
    let DimsError::Model { problems, .. } = &err else {
        panic!()
    };
    assert_eq!(
        problems,
        &vec![
            DimsProblem::HeadsNotDivisible { heads: 32, tp: 3 },
            DimsProblem::KvHeadsNotDivisible { kv_heads: 4, tp: 3 },
            DimsProblem::LayersNotDivisible {
                layers: 36,
                pp: 4,
                vpp: 2,
                product: 8
            },
            DimsProblem::ExpertsNotDivisible { experts: 6, ep: 4 },
            DimsProblem::SeqNotDivisibleByCp {
                seq: 4099,
                cp: 2,
                product: 4
            },
            DimsProblem::SeqNotDivisibleBySp {
                seq: 4099,
                cp: 2,
                tp: 3,
                product: 6
            },
        ],
        "{err}"
    );
    // ep on a dense model.
    let err = dims(
        8,
        ParallelConfig {
            ep: 2,
            ..Default::default()
        },
    )
    .validate_model(&m)
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("ep(2) > 1 but the model has no experts"),
        "{err}"
    );
}

/// Structural properties over many layouts: groups partition the world, positions are coordinates, both views
/// share the pipeline groups, and coordinates round-trip.
#[test]
fn group_structure_over_many_layouts() {
    let mut checked = 0;
    for world in [1, 2, 4, 6, 8, 12, 16, 24, 32] {
        for tp in [1, 2, 4] {
            for pp in [1, 2, 3] {
                for cp in [1, 2] {
                    for ep in [1, 2, 4] {
                        for etp in [1, 2] {
                            let cfg = ParallelConfig {
                                tp,
                                pp,
                                cp,
                                ep,
                                etp: Some(etp),
                                ..Default::default()
                            };
                            let Ok(d) = ParallelDims::new(world, cfg) else {
                                continue;
                            };
                            check_structure(&d);
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} layouts");
}

fn check_structure(d: &ParallelDims) {
    let w = d.world();
    assert_eq!(d.dp() * d.cp() * d.tp() * d.pp(), w);
    assert_eq!(d.edp() * d.ep() * d.etp() * d.pp(), w);
    for r in 0..w {
        assert_eq!(d.rank_of(d.coord(r)), r);
        assert_eq!(d.expert_rank_of(d.expert_coord(r)), r);
        assert_eq!(d.coord(r).pp, d.expert_coord(r).pp, "{d}: rank {r}");
    }
    for kind in GroupKind::ALL {
        let groups = d.groups(kind);
        if kind != GroupKind::Embedding {
            let all: Vec<usize> = groups.iter().flatten().copied().collect();
            let set: BTreeSet<usize> = all.iter().copied().collect();
            assert_eq!(all.len(), w, "{d} {kind}: not a partition");
            assert_eq!(set.len(), w, "{d} {kind}: not a partition");
            assert!(
                groups.iter().all(|g| g.len() == groups[0].len()),
                "{d} {kind}: uneven groups"
            );
        }
    }
    let sized =
        |k: GroupKind, s: usize| assert!(d.groups(k).iter().all(|g| g.len() == s), "{d} {k}");
    sized(GroupKind::Tp, d.tp());
    sized(GroupKind::Cp, d.cp());
    sized(GroupKind::Dp, d.dp());
    sized(GroupKind::DpCp, d.dp() * d.cp());
    sized(GroupKind::Pp, d.pp());
    sized(GroupKind::Ep, d.ep());
    sized(GroupKind::Etp, d.etp());
    sized(GroupKind::ExpertDp, d.edp());
    // Position inside a group = the coordinate of that dimension; other coordinates are fixed.
    for g in d.groups(GroupKind::Tp) {
        for (i, &r) in g.iter().enumerate() {
            let c = d.coord(r);
            assert_eq!(c.tp, i);
            assert_eq!((c.cp, c.dp, c.pp), {
                let c0 = d.coord(g[0]);
                (c0.cp, c0.dp, c0.pp)
            });
        }
    }
    for (kind, get) in [
        (
            GroupKind::Cp,
            (|c: DenseCoord| c.cp) as fn(DenseCoord) -> usize,
        ),
        (GroupKind::Dp, |c| c.dp),
        (GroupKind::Pp, |c| c.pp),
    ] {
        for g in d.groups(kind) {
            for (i, &r) in g.iter().enumerate() {
                assert_eq!(get(d.coord(r)), i, "{d} {kind} group {g:?}");
            }
        }
    }
    for (kind, get) in [
        (
            GroupKind::Ep,
            (|c: ExpertCoord| c.ep) as fn(ExpertCoord) -> usize,
        ),
        (GroupKind::Etp, |c| c.etp),
        (GroupKind::ExpertDp, |c| c.edp),
    ] {
        for g in d.groups(kind) {
            for (i, &r) in g.iter().enumerate() {
                assert_eq!(get(d.expert_coord(r)), i, "{d} {kind} group {g:?}");
            }
        }
    }
    // Expert groups stay inside a pipeline stage, and the pipeline groups of both views coincide.
    for k in [
        GroupKind::Ep,
        GroupKind::Etp,
        GroupKind::ExpertDp,
        GroupKind::EtpEp,
    ] {
        for g in d.groups(k) {
            assert!(
                g.iter().all(|&r| d.pp_stage(r) == d.pp_stage(g[0])),
                "{d} {k} {g:?}"
            );
        }
    }
    let expert_pp = orthogonal_groups(&d.expert_sizes(), &[false, false, false, true]);
    assert_eq!(expert_pp, d.groups(GroupKind::Pp), "{d}");
    // dp-cp groups are unions of dp groups.
    for g in d.groups(GroupKind::DpCp) {
        for &r in &g {
            assert!(
                d.group_of(GroupKind::Dp, r)
                    .unwrap()
                    .iter()
                    .all(|x| g.contains(x))
            );
        }
    }
}

#[test]
fn orthogonal_groups_matches_hand_enumeration() {
    // sizes [2, 3, 2] (innermost first), the middle dimension varying: rank = a + 2b + 6c.
    assert_eq!(
        orthogonal_groups(&[2, 3, 2], &[false, true, false]),
        vec![vec![0, 2, 4], vec![1, 3, 5], vec![6, 8, 10], vec![7, 9, 11]]
    );
    assert_eq!(
        orthogonal_groups(&[2, 3, 2], &[true, false, true]),
        vec![vec![0, 1, 6, 7], vec![2, 3, 8, 9], vec![4, 5, 10, 11]]
    );
}
