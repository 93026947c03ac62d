//! What an `rvq:` cache spec can ask for, declared once: [`OPTIONS`] is the parser, the printer
//! (a cache's `spec()`), the spec form help texts and the README show, and the help itself.
//! Kernel choices ([`KernelPaths`]) are not options of the spec: the default picks the fastest,
//! and tests and benchmarks set the others as references.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RvqOptions {
    /// First tokens kept in f16.
    pub sinks: usize,
    /// Last tokens kept in f16.
    pub recent: usize,
    /// Beam width of encoding (1 = greedy, the paper).
    pub beam: usize,
    /// Layers encoded with the beam, from the first (`None`: all); later layers are greedy.
    pub beam_layers: Option<usize>,
    pub quantize_keys: bool,
    pub quantize_values: bool,
    /// Use only the first K stages of the codebooks (`None`: all).
    pub stages: Option<usize>,
    /// How the codebooks are held (`books=i8`, the default).
    pub books: BookPrecision,
    /// Which kernels attention and encoding use.
    pub paths: KernelPaths,
}

impl Default for RvqOptions {
    fn default() -> Self {
        Self {
            sinks: 0,
            recent: 0,
            beam: 1,
            beam_layers: None,
            quantize_keys: true,
            quantize_values: true,
            stages: None,
            books: BookPrecision::default(),
            paths: KernelPaths::default(),
        }
    }
}

/// One `key=value` option of an `rvq:` spec.
pub struct RvqOption {
    pub name: &'static str,
    /// The value as the spec form shows it (`S`, `k|v`).
    pub value: &'static str,
    /// What it does, for `--help`.
    pub help: &'static str,
    parse: fn(&mut RvqOptions, &str) -> Result<(), String>,
    /// The value `options` holds, `None` at the default (a spec leaves it out).
    print: fn(&RvqOptions) -> Option<String>,
}

/// Every option of an `rvq:` spec, in the order a spec writes them.
pub const OPTIONS: [RvqOption; 7] = [
    RvqOption {
        name: "sinks",
        value: "S",
        help: "the first S tokens kept in f16 (attention sinks; 0 or more)",
        parse: |o, v| whole("sinks", v).map(|n| o.sinks = n),
        print: |o| (o.sinks > 0).then(|| o.sinks.to_string()),
    },
    RvqOption {
        name: "recent",
        value: "W",
        help: "the last W tokens kept in f16, encoded as they leave the window (0 or more)",
        parse: |o, v| whole("recent", v).map(|n| o.recent = n),
        print: |o| (o.recent > 0).then(|| o.recent.to_string()),
    },
    RvqOption {
        name: "beam",
        value: "B",
        help: "beam width of encoding, 1..=C (1, the default: greedy, as the paper)",
        parse: |o, v| {
            o.beam = whole("beam", v)?;
            match o.beam {
                0 => Err("beam must be at least 1".into()),
                _ => Ok(()),
            }
        },
        print: |o| (o.beam > 1).then(|| o.beam.to_string()),
    },
    RvqOption {
        name: "beam-layers",
        value: "L",
        help: "encode only the first L layers (0 or more) with the beam, the rest greedily (a \
               fraction of the beam's encode cost)",
        parse: |o, v| whole("beam-layers", v).map(|n| o.beam_layers = Some(n)),
        print: |o| o.beam_layers.map(|n| n.to_string()),
    },
    RvqOption {
        name: "stages",
        value: "K",
        help: "use only the first K stages of the codebooks (1 to the file's K)",
        parse: |o, v| whole("stages", v).map(|n| o.stages = Some(n)),
        print: |o| o.stages.map(|k| k.to_string()),
    },
    RvqOption {
        name: "books",
        value: "i8|f16|f32",
        help:
            "codebooks held in i8 with a scale per stage and channel, summed exactly in i16 (the \
               default: a quarter of f32's bytes, the fewest for a decode step to read, sum and \
               search), in f16, or in f32 as trained",
        parse: |o, v| one_of("books", v, &BOOKS).map(|b| o.books = b),
        print: |o| (o.books != BookPrecision::default()).then(|| name_of(&BOOKS, o.books)),
    },
    RvqOption {
        name: "only",
        value: "k|v",
        help: "quantize only the keys or only the values; the other part stays in f16",
        parse: |o, v| {
            one_of("only", v, &ONLY).map(|(k, v)| (o.quantize_keys, o.quantize_values) = (k, v))
        },
        print: |o| match (o.quantize_keys, o.quantize_values) {
            (true, true) | (false, false) => None,
            parts => Some(name_of(&ONLY, parts)),
        },
    },
];

const BOOKS: [(&str, BookPrecision); 3] = [
    ("i8", BookPrecision::I8),
    ("f16", BookPrecision::F16),
    ("f32", BookPrecision::F32),
];

/// (quantize keys, quantize values).
const ONLY: [(&str, (bool, bool)); 2] = [("k", (true, false)), ("v", (false, true))];

impl RvqOptions {
    /// The beam width layer `layer` encodes with.
    pub fn beam_of(&self, layer: usize) -> usize {
        match self.beam_layers {
            Some(n) if layer >= n => 1,
            _ => self.beam,
        }
    }

    /// The options of the comma-separated `key=value` list that follows an `rvq:` spec's file.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut options = Self::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("option '{item}' is not key=value"))?;
            let Some(option) = OPTIONS.iter().find(|o| o.name == key) else {
                let names: Vec<&str> = OPTIONS.iter().map(|o| o.name).collect();
                return Err(format!(
                    "unknown rvq option '{key}' (known: {})",
                    names.join(", ")
                ));
            };
            (option.parse)(&mut options, value)?;
        }
        Ok(options)
    }

    /// The options as a spec writes them after its file: `,key=value` for each one not at its
    /// default (`parse` gives them back).
    pub fn spec_suffix(&self) -> String {
        OPTIONS
            .iter()
            .filter_map(|o| (o.print)(self).map(|v| format!(",{}={v}", o.name)))
            .collect()
    }
}

/// `rvq:FILE.safetensors[,sinks=S]…`: the spec form help texts and the README show.
pub fn spec_form() -> String {
    let options: String = OPTIONS
        .iter()
        .map(|o| format!("[,{}={}]", o.name, o.value))
        .collect();
    format!("rvq:FILE.safetensors{options}")
}

/// One line per option: `name=VALUE  what it does`, indented by `indent` and wrapped at `width`.
pub fn help(indent: usize, width: usize) -> String {
    /// Columns for `name=VALUE` before the help starts; a longer one gets a line of its own.
    const HEAD: usize = 12;
    let mut out = String::new();
    for o in &OPTIONS {
        let head = format!("{:indent$}{}={}", "", o.name, o.value);
        let mut line = if head.len() < indent + HEAD {
            format!("{head:<w$}", w = indent + HEAD + 1)
        } else {
            out += &head;
            out.push('\n');
            format!("{:w$}", "", w = indent + HEAD + 1)
        };
        for word in o.help.split_whitespace() {
            if line.len() + word.len() >= width {
                out += line.trim_end();
                out.push('\n');
                line = format!("{:w$}", "", w = indent + HEAD + 1);
            }
            line += word;
            line.push(' ');
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

/// Kernel choices: the defaults are the fastest; the others are the references tests and
/// benchmarks compare them with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelPaths {
    /// How attention reduces coded values.
    pub values: ValuePath,
    /// How attention scores coded keys.
    pub keys: KeyPath,
    /// Encode a decode step's few vectors with an f16 lane-layout copy of the codebooks
    /// ([`rvq::few::FewVectorEncoder`], AVX2 only): ~2× faster encoding than searching the
    /// codebooks as held, for half the codebooks' bytes again — and attention, which gathers
    /// from the codebooks, then finds them cold (docs/DECISIONS.md).
    pub lane_encoder: bool,
}

/// How an RVQ cache holds its codebooks; fewer bytes held are also fewer bytes a decode step
/// reads from them (encoding searches every stage, attention gathers codewords).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BookPrecision {
    /// As trained.
    F32,
    /// Rounded to f16 ([`rvq::HalfRvq`]): half the bytes; codes and sums are those of the
    /// f16-rounded codewords (perplexity unchanged within noise).
    F16,
    /// i8 with a scale per stage and channel, whole multiples of one unit per channel so that a
    /// vector's codewords sum exactly in i16 ([`rvq::I8Rvq`]): a quarter of the bytes;
    /// sums are those of the dequantized codewords, and so are the codes but for near ties a
    /// decode step's search may break the other way (perplexity unchanged within noise).
    /// The default: the fewest bytes, the fastest attention and (with AVX-512 VNNI) the
    /// fastest decode-step encode.
    #[default]
    I8,
}

/// How attention scores queries against coded keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyPath {
    /// Decode, rotate and multiply in the quantizer's group order, block by block (see
    /// [`super::kernels::key_scores`]); falls back to `Decode` for layouts that mix channels.
    #[default]
    Fused,
    /// Decode into dense keys in channel order, rotate, multiply (the reference path).
    Decode,
}

/// How attention turns weights over coded values into outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValuePath {
    /// `Fused` for a decode step's few rows (where it applies); otherwise histograms or
    /// decoding, whichever the cost model says is cheaper for this many rows and tokens.
    #[default]
    Auto,
    /// Decode values block by block, then multiply (the reference path).
    Decode,
    /// A few query rows (a decode step): each value's codewords summed in registers and added
    /// with each row's weight ([`super::kernels::fused_value_sums`]; d = 32, else `Decode`).
    Fused,
    /// Per-stage histograms of the weights over the codes, times the codebooks.
    Histogram,
}

fn whole(option: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .map_err(|_| format!("{option}={value}: not a whole number"))
}

/// The choice named `value` of option `option`, or an error listing the names.
fn one_of<T: Copy>(option: &str, value: &str, choices: &[(&str, T)]) -> Result<T, String> {
    if let Some(&(_, c)) = choices.iter().find(|(name, _)| *name == value) {
        return Ok(c);
    }
    let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
    let listed = match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(format!("{option}={value}: expected {listed}"))
}

/// The name of `value` among `choices`.
fn name_of<T: PartialEq>(choices: &[(&str, T)], value: T) -> String {
    choices
        .iter()
        .find(|(_, c)| *c == value)
        .map(|(name, _)| name.to_string())
        .expect("every value has a name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_prints_what_it_parses() {
        for list in [
            "",
            "sinks=4",
            "recent=32,beam=2",
            "sinks=4,recent=32,beam=3,beam-layers=10,stages=6,books=f16,only=k",
            "books=f32,only=v",
        ] {
            let o = RvqOptions::parse(list).unwrap();
            let suffix = o.spec_suffix();
            assert_eq!(suffix.trim_start_matches(','), list);
            assert_eq!(RvqOptions::parse(&suffix).unwrap(), o);
        }
        // Defaults spelled out are left out when printed.
        let o = RvqOptions::parse("beam=1,books=i8").unwrap();
        assert_eq!(o, RvqOptions::default());
        assert_eq!(o.spec_suffix(), "");
    }

    #[test]
    fn bad_options_are_named() {
        for (list, message) in [
            ("books=f8", "books=f8: expected i8, f16 or f32"),
            ("only=x", "only=x: expected k or v"),
            ("beam=0", "beam must be at least 1"),
            ("sinks=-1", "sinks=-1: not a whole number"),
            ("sinks", "option 'sinks' is not key=value"),
            (
                "values=fused",
                "unknown rvq option 'values' (known: sinks, recent, beam, beam-layers, stages, books, \
                 only)",
            ),
        ] {
            assert_eq!(RvqOptions::parse(list).unwrap_err(), message, "{list}");
        }
    }

    #[test]
    fn the_spec_form_and_help_list_every_option() {
        let form = spec_form();
        let text = help(2, 100);
        for o in &OPTIONS {
            assert!(
                form.contains(&format!("[,{}={}]", o.name, o.value)),
                "{form}"
            );
            assert!(text.contains(&format!("{}={}", o.name, o.value)), "{text}");
        }
        assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
    }
}
