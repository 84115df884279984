//! The orientation tag of an EXIF (TIFF-structured) block.

use super::Orientation;

/// Orientation from a TIFF-structured EXIF block (the payload of a JPEG APP1
/// segment after `Exif\0\0`, of a PNG `eXIf` chunk or a WebP `EXIF` chunk).
/// A damaged or absent block means "as stored": EXIF is metadata, and a broken
/// one must not cost a good image (Pillow and browsers agree).
pub(crate) fn orientation_from_tiff(tiff: &[u8]) -> Orientation {
    let Ok(exif) = exif::Reader::new().read_raw(tiff.to_vec()) else {
        return Orientation::Identity;
    };
    exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|field| field.value.get_uint(0))
        .map(Orientation::from_exif)
        .unwrap_or_default()
}

/// A minimal big-endian TIFF block holding only the orientation tag: what tests
/// and fixture writers put into an APP1 `Exif` segment.
#[cfg(test)]
pub(crate) fn tiff_with_orientation(value: u16) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(b"MM\0\x2a");
    t.extend_from_slice(&8u32.to_be_bytes()); // offset of IFD0
    t.extend_from_slice(&1u16.to_be_bytes()); // one entry
    t.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    t.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    t.extend_from_slice(&1u32.to_be_bytes()); // count
    t.extend_from_slice(&value.to_be_bytes());
    t.extend_from_slice(&[0, 0]); // padding of the 4-byte value field
    t.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tag_and_tolerates_damage() {
        assert_eq!(
            orientation_from_tiff(&tiff_with_orientation(6)),
            Orientation::Rotate90
        );
        assert_eq!(
            orientation_from_tiff(&tiff_with_orientation(1)),
            Orientation::Identity
        );
        // Out-of-range value, truncated block, garbage: as stored.
        assert_eq!(
            orientation_from_tiff(&tiff_with_orientation(42)),
            Orientation::Identity
        );
        assert_eq!(
            orientation_from_tiff(&tiff_with_orientation(6)[..12]),
            Orientation::Identity
        );
        assert_eq!(
            orientation_from_tiff(b"not tiff at all"),
            Orientation::Identity
        );
    }
}
