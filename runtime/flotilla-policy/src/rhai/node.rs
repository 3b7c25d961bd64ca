//! Nodes as Rhai values: a `node` type that reads like the node map it
//! replaced (`n.version`, `n["version"]`, `n.labels` as `[key, value]` pairs,
//! `"version" in n`, `n == #{...}`, `${n}`), without building a map per node.
//!
//! The nodes of a call are copied once into a [`Chunk`] (Rhai values must own
//! their data): versions shared across the chunk (a fleet has few), every
//! other string as a range of one text buffer, turned into a Rhai string when
//! a script reads it. A node value is the chunk and an index; copying one is a
//! reference count. `n.to_map()` gives the full map when a script wants one.

use flotilla_model::Node;
use rhai::{Array, Dynamic, Engine, EvalAltResult, INT, ImmutableString, Map, NativeCallContext};
use std::collections::HashMap;
use std::sync::Arc;

/// The fields of a node, in the (sorted) key order of its map.
pub(super) const FIELDS: [&str; 9] = [
    "asset_path",
    "attributes",
    "healthy",
    "id",
    "labels",
    "last_seen",
    "online",
    "schedulable",
    "version",
];

/// A range of [`Chunk::text`].
#[derive(Clone, Copy)]
struct Text(u32, u32);

struct Data {
    id: Text,
    version: ImmutableString,
    asset_path: Text,
    /// Ranges of [`Chunk::pairs`].
    labels: (u32, u32),
    attributes: (u32, u32),
    healthy: bool,
    schedulable: bool,
    online: bool,
    last_seen: u64,
}

/// The nodes handed to one call.
pub(super) struct Chunk {
    text: String,
    pairs: Vec<(Text, Text)>,
    nodes: Vec<Data>,
}

fn put(text: &mut String, s: &str) -> Text {
    let at = text.len();
    text.push_str(s);
    match (u32::try_from(at), u32::try_from(text.len())) {
        (Ok(a), Ok(b)) => Text(a, b),
        _ => Text(u32::MAX, u32::MAX),
    }
}

/// One node of a [`Chunk`]: the Rhai type `node`.
#[derive(Clone)]
pub(super) struct RhaiNode {
    chunk: Arc<Chunk>,
    index: usize,
}

impl Chunk {
    /// The chunk's nodes as an array of `node` values.
    pub(super) fn array(nodes: &[Node]) -> Array {
        let chunk = Arc::new(Chunk::new(nodes));
        (0..nodes.len())
            .map(|index| {
                Dynamic::from(RhaiNode {
                    chunk: chunk.clone(),
                    index,
                })
            })
            .collect()
    }

    /// One node as a `node` value.
    pub(super) fn one(node: &Node) -> Dynamic {
        Dynamic::from(RhaiNode {
            chunk: Arc::new(Chunk::new(std::slice::from_ref(node))),
            index: 0,
        })
    }

    fn new(nodes: &[Node]) -> Chunk {
        let mut text = String::new();
        let mut pairs = Vec::new();
        let mut versions: HashMap<&str, ImmutableString> = HashMap::new();
        let data = nodes
            .iter()
            .map(|n| {
                let id = put(&mut text, &n.id);
                let asset_path = put(&mut text, &n.asset_path);
                let mut list = |list: &[(String, String)]| {
                    let from = pairs.len() as u32;
                    for (k, v) in list {
                        let k = put(&mut text, k);
                        let v = put(&mut text, v);
                        pairs.push((k, v));
                    }
                    (from, pairs.len() as u32)
                };
                let labels = list(&n.labels);
                let attributes = list(&n.attributes);
                let version = versions
                    .entry(n.version.as_str())
                    .or_insert_with(|| n.version.as_str().into())
                    .clone();
                Data {
                    id,
                    version,
                    asset_path,
                    labels,
                    attributes,
                    healthy: n.healthy,
                    schedulable: n.schedulable,
                    online: n.online,
                    last_seen: n.last_seen,
                }
            })
            .collect();
        Chunk {
            text,
            pairs,
            nodes: data,
        }
    }

    fn str(&self, t: Text) -> &str {
        // Ranges are u32: past 4 GiB of text in one call (never, with chunks
        // of 4096 nodes) a string would read as empty rather than wrong.
        self.text.get(t.0 as usize..t.1 as usize).unwrap_or("")
    }
}

impl RhaiNode {
    fn data(&self) -> &Data {
        &self.chunk.nodes[self.index]
    }

    fn text(&self, t: Text) -> ImmutableString {
        self.chunk.str(t).into()
    }

    fn pairs(&self, (from, to): (u32, u32)) -> Array {
        self.chunk.pairs[from as usize..to as usize]
            .iter()
            .map(|&(k, v)| Dynamic::from_array(vec![self.text(k).into(), self.text(v).into()]))
            .collect()
    }

    /// A field by name; `()` for a name that is not a field (as a map would).
    fn field(&self, key: &str) -> Dynamic {
        let d = self.data();
        match key {
            "id" => self.text(d.id).into(),
            "version" => d.version.clone().into(),
            "labels" => self.pairs(d.labels).into(),
            "attributes" => self.pairs(d.attributes).into(),
            "asset_path" => self.text(d.asset_path).into(),
            "healthy" => d.healthy.into(),
            "schedulable" => d.schedulable.into(),
            "online" => d.online.into(),
            "last_seen" => Dynamic::from_int(super::to_int(d.last_seen)),
            _ => Dynamic::UNIT,
        }
    }

    /// The node as the map of its JSON shape.
    pub(super) fn to_map(&self) -> Map {
        FIELDS
            .iter()
            .map(|k| ((*k).into(), self.field(k)))
            .collect()
    }
}

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Registers the `node` type: getters for every field, the string indexer
/// (unknown names are `()`), and what scripts did with node maps.
pub(super) fn register(engine: &mut Engine) {
    engine.register_type_with_name::<RhaiNode>("node");
    engine.register_get("id", |n: &mut RhaiNode| n.text(n.data().id));
    engine.register_get("version", |n: &mut RhaiNode| n.data().version.clone());
    engine.register_get("labels", |n: &mut RhaiNode| n.pairs(n.data().labels));
    engine.register_get("attributes", |n: &mut RhaiNode| {
        n.pairs(n.data().attributes)
    });
    engine.register_get("asset_path", |n: &mut RhaiNode| n.text(n.data().asset_path));
    engine.register_get("healthy", |n: &mut RhaiNode| n.data().healthy);
    engine.register_get("schedulable", |n: &mut RhaiNode| n.data().schedulable);
    engine.register_get("online", |n: &mut RhaiNode| n.data().online);
    engine.register_get("last_seen", |n: &mut RhaiNode| -> INT {
        super::to_int(n.data().last_seen)
    });
    engine.register_indexer_get(|n: &mut RhaiNode, key: &str| n.field(key));

    engine.register_fn("to_map", |n: &mut RhaiNode| n.to_map());
    engine.register_fn("keys", |_: &mut RhaiNode| -> Array {
        FIELDS.iter().map(|k| Dynamic::from(*k)).collect()
    });
    engine.register_fn("values", |n: &mut RhaiNode| -> Array {
        FIELDS.iter().map(|k| n.field(k)).collect()
    });
    engine.register_fn("len", |_: &mut RhaiNode| FIELDS.len() as INT);
    engine.register_fn("is_empty", |_: &mut RhaiNode| false);
    // `"version" in n`
    engine.register_fn("contains", |_: &mut RhaiNode, key: &str| {
        FIELDS.contains(&key)
    });
    engine.register_fn("get", |n: &mut RhaiNode, key: &str| n.field(key));
    engine.register_fn("to_string", |n: &mut RhaiNode| {
        Dynamic::from_map(n.to_map()).to_string()
    });
    engine.register_fn("to_debug", |n: &mut RhaiNode| {
        format!("{:?}", Dynamic::from_map(n.to_map()))
    });

    // Equality with nodes and node maps compares the maps.
    fn eq(ctx: &NativeCallContext, a: Map, b: Map) -> RhaiResult<bool> {
        ctx.call_native_fn("==", (a, b))
    }
    engine.register_fn(
        "==",
        |ctx: NativeCallContext, a: &mut RhaiNode, b: Map| -> RhaiResult<bool> {
            eq(&ctx, a.to_map(), b)
        },
    );
    engine.register_fn(
        "!=",
        |ctx: NativeCallContext, a: &mut RhaiNode, b: Map| -> RhaiResult<bool> {
            Ok(!eq(&ctx, a.to_map(), b)?)
        },
    );
    engine.register_fn(
        "==",
        |ctx: NativeCallContext, a: &mut Map, b: RhaiNode| -> RhaiResult<bool> {
            eq(&ctx, a.clone(), b.to_map())
        },
    );
    engine.register_fn(
        "!=",
        |ctx: NativeCallContext, a: &mut Map, b: RhaiNode| -> RhaiResult<bool> {
            Ok(!eq(&ctx, a.clone(), b.to_map())?)
        },
    );
    engine.register_fn(
        "==",
        |ctx: NativeCallContext, a: &mut RhaiNode, b: RhaiNode| -> RhaiResult<bool> {
            eq(&ctx, a.to_map(), b.to_map())
        },
    );
    engine.register_fn(
        "!=",
        |ctx: NativeCallContext, a: &mut RhaiNode, b: RhaiNode| -> RhaiResult<bool> {
            Ok(!eq(&ctx, a.to_map(), b.to_map())?)
        },
    );
}
