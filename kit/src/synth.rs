//! Seeded synthetic datasets in the layouts of the real ones.
//!
//! - [`write_sa1b`]: SA-1B-style shards (`sa_NNNNNN.tar`, gzip-compressed although
//!   named `.tar`, members `./sa_<id>.jpg` and a large `./sa_<id>.json` mask file in
//!   shuffled order), the `links.tsv` file (`file_name<TAB>cdn_link`) and a
//!   `SA1B_caption.tar.gz` of `sa_<id>.txt` as PixArt's SAM-LLaVA captions come.
//! - [`write_webdataset`]: img2dataset-style WebDataset tars (`key.jpg`, `key.txt`,
//!   `key.json`), as PD12M is published.
//!
//! Images are real JPEGs (smooth colour fields with texture), so decoders, resizers
//! and encoders see photo-like input. The same seed gives the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A photo-like JPEG of `width` x `height` (quality 90, 4:2:0), seeded
/// ([`crate::synth_image::photo_jpeg`]).
pub fn jpeg(width: u32, height: u32, seed: u64) -> Vec<u8> {
    crate::synth_image::photo_jpeg(width, height, seed, 90)
        .expect("JPEG encoding into memory cannot fail")
}

/// Writes a tar of `members` (name, bytes) to `path`, gzip-compressed if `gzip`.
pub fn write_tar(path: &Path, members: &[(String, Vec<u8>)], gzip: bool) -> io::Result<()> {
    let file = io::BufWriter::new(std::fs::File::create(path)?);
    let w: Box<dyn Write> = if gzip {
        Box::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ))
    } else {
        Box::new(file)
    };
    let mut b = tar::Builder::new(w);
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        if name.len() <= 100 {
            // Raw name bytes: the tar crate's path setters drop a leading `./`, which
            // real datasets (SA-1B) have and readers must cope with.
            let raw = &mut h.as_old_mut().name;
            raw.fill(0);
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, data.as_slice())?;
        } else {
            b.append_data(&mut h, name, data.as_slice())?;
        }
    }
    b.into_inner()?.flush()
}

/// What [`write_sa1b`] wrote.
#[derive(Debug, Clone)]
pub struct Sa1bLayout {
    /// The shard files, in order.
    pub shards: Vec<PathBuf>,
    /// The links file.
    pub links: PathBuf,
    /// The caption tar.
    pub captions: PathBuf,
    /// Image ids (`sa_<n>`) per shard, in shard order (sorted within a shard).
    pub ids: Vec<Vec<String>>,
    /// Caption of every id.
    pub caption_of: BTreeMap<String, String>,
    /// (width, height) of every id's image.
    pub size_of: BTreeMap<String, (u32, u32)>,
}

/// Shape of a synthetic SA-1B.
#[derive(Debug, Clone)]
pub struct Sa1bSpec {
    /// Number of shards.
    pub shards: usize,
    /// Images per shard.
    pub images_per_shard: usize,
    /// Shortest image side (SA-1B: 1500); the other side is 1.5x or 1.33x.
    pub short_side: u32,
    /// Bytes of each mask `.json` member (SA-1B's are megabytes).
    pub mask_json_bytes: usize,
    /// Seed.
    pub seed: u64,
    /// The base URL the links file points at (e.g. a loopback server), or `None` for
    /// `file://` URLs of the shards.
    pub base_url: Option<String>,
}

const CAPTION_WORDS: &[&str] = &[
    "a",
    "red",
    "bicycle",
    "leaning",
    "against",
    "brick",
    "wall",
    "in",
    "the",
    "afternoon",
    "sun",
    "with",
    "two",
    "people",
    "walking",
    "past",
    "old",
    "town",
    "square",
    "trees",
    "and",
    "blue",
    "sky",
    "street",
    "market",
];

fn caption(rng: &mut StdRng) -> String {
    let n = rng.random_range(6..18);
    let words: Vec<&str> = (0..n)
        .map(|_| CAPTION_WORDS[rng.random_range(0..CAPTION_WORDS.len())])
        .collect();
    let lead = [
        "The image shows ",
        "In this image, we can see ",
        "",
        "The image features ",
    ][rng.random_range(0..4)];
    format!("{lead}{}.", words.join(" "))
}

/// Writes a synthetic SA-1B into `dir`.
pub fn write_sa1b(dir: &Path, spec: &Sa1bSpec) -> io::Result<Sa1bLayout> {
    std::fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut layout = Sa1bLayout {
        shards: Vec::new(),
        links: dir.join("links.tsv"),
        captions: dir.join("SA1B_caption.tar.gz"),
        ids: Vec::new(),
        caption_of: BTreeMap::new(),
        size_of: BTreeMap::new(),
    };
    let mut links = String::from("file_name\tcdn_link\n");
    let mut caption_members = Vec::new();
    let mut next_id = 1 + rng.random_range(0..1000u64);
    for s in 0..spec.shards {
        let name = format!("sa_{s:06}.tar");
        let mut members = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..spec.images_per_shard {
            let id = format!("sa_{next_id}");
            next_id += 1 + rng.random_range(0..3u64);
            let long = if rng.random_bool(0.5) {
                spec.short_side * 3 / 2
            } else {
                spec.short_side * 4 / 3
            };
            let (w, h) = if rng.random_bool(0.7) {
                (long, spec.short_side)
            } else {
                (spec.short_side, long)
            };
            members.push((format!("./{id}.jpg"), jpeg(w, h, rng.random())));
            let mut mask = format!(
                "{{\"image\": {{\"image_id\": \"{id}\", \"width\": {w}, \"height\": {h}}}, \"annotations\": ["
            );
            while mask.len() < spec.mask_json_bytes {
                mask.push_str(
                    "{\"segmentation\": {\"counts\": \"PPYo0d0Z1j0N2O1N2N1O1O1O0O2N1N3\"}},",
                );
            }
            mask.push_str("{}]}");
            members.push((format!("./{id}.json"), mask.into_bytes()));
            let cap = caption(&mut rng);
            caption_members.push((format!("{id}.txt"), cap.clone().into_bytes()));
            layout.caption_of.insert(id.clone(), cap);
            layout.size_of.insert(id.clone(), (w, h));
            ids.push(id);
        }
        members.shuffle(&mut rng);
        let path = dir.join(&name);
        write_tar(&path, &members, true)?;
        let url = match &spec.base_url {
            Some(base) => format!("{}/{name}", base.trim_end_matches('/')),
            None => format!("file://{}", path.canonicalize()?.display()),
        };
        links.push_str(&format!("{name}\t{url}\n"));
        ids.sort();
        layout.ids.push(ids);
        layout.shards.push(path);
    }
    std::fs::write(&layout.links, links)?;
    caption_members.shuffle(&mut rng);
    write_tar(&layout.captions, &caption_members, true)?;
    Ok(layout)
}

/// What [`write_webdataset`] wrote.
#[derive(Debug, Clone)]
pub struct WdsLayout {
    /// The shard files, in order.
    pub shards: Vec<PathBuf>,
    /// Sample keys per shard, in member order.
    pub keys: Vec<Vec<String>>,
    /// Caption of every key.
    pub caption_of: BTreeMap<String, String>,
}

/// Writes `shards` img2dataset-style tars `<prefix>-NNNNNN.tar` into `dir`, each with
/// `per_shard` samples `key.jpg`, `key.txt`, `key.json` of `width` x `height` images.
pub fn write_webdataset(
    dir: &Path,
    prefix: &str,
    shards: usize,
    per_shard: usize,
    (width, height): (u32, u32),
    seed: u64,
) -> io::Result<WdsLayout> {
    std::fs::create_dir_all(dir)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = WdsLayout {
        shards: Vec::new(),
        keys: Vec::new(),
        caption_of: BTreeMap::new(),
    };
    for s in 0..shards {
        let mut members = Vec::new();
        let mut keys = Vec::new();
        for i in 0..per_shard {
            let key = format!("{s:05}{i:04}");
            let cap = caption(&mut rng);
            members.push((format!("{key}.jpg"), jpeg(width, height, rng.random())));
            members.push((format!("{key}.txt"), cap.clone().into_bytes()));
            members.push((
                format!("{key}.json"),
                format!("{{\"key\": \"{key}\", \"width\": {width}, \"height\": {height}, \"status\": \"success\"}}")
                    .into_bytes(),
            ));
            out.caption_of.insert(key.clone(), cap);
            keys.push(key);
        }
        let path = dir.join(format!("{prefix}-{s:06}.tar"));
        write_tar(&path, &members, false)?;
        out.shards.push(path);
        out.keys.push(keys);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn sa1b_layout_is_gzip_shuffled_and_complete() {
        let dir = std::env::temp_dir().join(format!("tb-synth-{}", std::process::id()));
        let spec = Sa1bSpec {
            shards: 2,
            images_per_shard: 3,
            short_side: 64,
            mask_json_bytes: 5000,
            seed: 7,
            base_url: None,
        };
        let l = write_sa1b(&dir, &spec).unwrap();
        assert_eq!(l.shards.len(), 2);
        let raw = std::fs::read(&l.shards[0]).unwrap();
        assert_eq!(
            &raw[..2],
            &[0x1f, 0x8b],
            "shards are gzip despite the .tar name"
        );
        let mut names = Vec::new();
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(raw.as_slice()));
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            if name.ends_with(".jpg") {
                let img = image::load_from_memory(&data).unwrap();
                let id = name.trim_start_matches("./").trim_end_matches(".jpg");
                assert_eq!((img.width(), img.height()), l.size_of[id]);
            } else {
                assert!(data.len() >= 5000);
            }
            names.push(name);
        }
        assert_eq!(names.len(), 6);
        assert!(names.iter().all(|n| n.starts_with("./sa_")));
        let links = std::fs::read_to_string(&l.links).unwrap();
        assert!(links.starts_with("file_name\tcdn_link\nsa_000000.tar\tfile://"));
        assert_eq!(l.caption_of.len(), 6);
        // same seed, same bytes
        let dir2 = dir.join("again");
        let l2 = write_sa1b(&dir2, &spec).unwrap();
        assert_eq!(
            std::fs::read(&l2.shards[1]).unwrap(),
            std::fs::read(&l.shards[1]).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
