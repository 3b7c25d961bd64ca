//! A policy that misbehaves on request: the task param `mode` picks how.
//! `loop` spins forever, `alloc` allocates until it is stopped, `leak` keeps
//! 6 MiB more on every `select` call, `count` asks the fleet for its size
//! once, `panic` panics,
//! `unknown-node` / `empty-wave` / `duplicate` return a bad plan,
//! `empty-reason` pauses without a reason, `short` returns too few selections,
//! `echo` skips every node with the node as it arrived (`{:?}`) as the detail
//! (the first one's also has the task context), `calendar` pauses with what
//! the runner's calendar says about the instant in the param `at` and the
//! zone `zone`, the report's `skipped` and the context's retries.
//! Any other mode behaves (includes every node, one wave, proceeds).

use flotilla_sdk::{Context, Node, Policy, Selection, Verdict, Wave, WaveReport};

struct Misbehave;

fn mode(ctx: &Context) -> String {
    ctx.param_or("mode", String::new())
}

#[flotilla_sdk::policy(name = "misbehave")]
impl Policy for Misbehave {
    fn select(ctx: &Context, nodes: &[Node]) -> Vec<Selection> {
        match mode(ctx).as_str() {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "leak" => {
                // Keeps 6 MiB per call, as a runtime whose collector lags.
                static HOARD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
                let mut hoard = HOARD.lock().unwrap_or_else(|e| e.into_inner());
                hoard.push(vec![1u8; 6 << 20]);
                std::hint::black_box(&hoard);
                vec![Selection::Include; nodes.len()]
            }
            "count" => {
                // One host call (the test's fleet is slow to answer).
                let n = flotilla_sdk::host::count(&flotilla_sdk::host::Selector::default());
                std::hint::black_box(n);
                vec![Selection::Include; nodes.len()]
            }
            "panic" => panic!("misbehave was told to panic"),
            "short" => vec![Selection::Include; nodes.len().saturating_sub(1)],
            "echo" => nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let detail = match i {
                        0 => format!("{n:?} {:?}", ctx.task),
                        _ => format!("{n:?}"),
                    };
                    Selection::skip(flotilla_sdk::SkipReason::Policy, detail)
                })
                .collect(),
            _ => vec![Selection::Include; nodes.len()],
        }
    }

    fn plan(ctx: &Context, nodes: &[Node]) -> Vec<Wave> {
        let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        let wave = |name: &str, nodes: Vec<String>| Wave {
            name: name.into(),
            nodes,
            concurrency: 0,
            soak_seconds: 0,
            needs_approval: false,
        };
        match mode(ctx).as_str() {
            "unknown-node" => vec![wave("all", [ids, vec!["ghost".into()]].concat())],
            "empty-wave" => vec![wave("first", ids), wave("second", Vec::new())],
            "duplicate" => vec![wave("a", ids.clone()), wave("b", ids)],
            _ => vec![wave("all", ids)],
        }
    }

    fn evaluate(ctx: &Context, report: &WaveReport) -> Verdict {
        match mode(ctx).as_str() {
            "empty-reason" => Verdict::Pause(String::new()),
            "calendar" => {
                use flotilla_sdk::host::{local_time, window_next_open, window_open};
                let at: u64 = ctx.param_or("at", 0);
                let zone: String = ctx.param_or("zone", String::new());
                let t = local_time(at, &zone);
                let open = window_open("0 2 * * *", 60, &zone, at);
                let next = window_next_open("0 2 * * *", 60, &zone, at);
                Verdict::Pause(format!(
                    "{t:?} open {open:?} next {next:?} skipped {} retries {}/{}",
                    report.skipped, ctx.retries_failed, ctx.retries_timed_out
                ))
            }
            _ => Verdict::Proceed,
        }
    }
}
