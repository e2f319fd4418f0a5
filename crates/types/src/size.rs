use std::fmt;

use serde::{Deserialize, Serialize};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// A byte count. Arithmetic saturates: capacity accounting must never wrap around, and a
/// saturated value is easier to spot in a log than a wrapped one.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Size(u64);

impl Size {
    pub const ZERO: Size = Size(0);

    pub const fn bytes(n: u64) -> Self {
        Size(n)
    }

    pub const fn kib(n: u64) -> Self {
        Size(n.saturating_mul(KIB))
    }

    pub const fn mib(n: u64) -> Self {
        Size(n.saturating_mul(MIB))
    }

    pub const fn gib(n: u64) -> Self {
        Size(n.saturating_mul(GIB))
    }

    pub const fn tib(n: u64) -> Self {
        Size(n.saturating_mul(TIB))
    }

    pub const fn as_bytes(self) -> u64 {
        self.0
    }

    /// Whole mebibytes, rounded down.
    pub const fn as_mib(self) -> u64 {
        self.0 / MIB
    }

    pub const fn saturating_add(self, other: Size) -> Size {
        Size(self.0.saturating_add(other.0))
    }

    pub const fn saturating_sub(self, other: Size) -> Size {
        Size(self.0.saturating_sub(other.0))
    }

    pub const fn checked_sub(self, other: Size) -> Option<Size> {
        match self.0.checked_sub(other.0) {
            Some(n) => Some(Size(n)),
            None => None,
        }
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<u64> for Size {
    fn from(n: u64) -> Self {
        Size(n)
    }
}

impl fmt::Display for Size {
    /// Binary units with at most two decimals, dropping trailing zeros: `512 B`, `1.5 KiB`,
    /// `10 GiB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
        for (scale, unit) in units {
            if self.0 >= scale {
                // Work in hundredths with integer arithmetic so huge values stay exact enough
                // and no float formatting quirk leaks into logs.
                let hundredths =
                    (u128::from(self.0) * 100 + u128::from(scale) / 2) / u128::from(scale);
                let whole = hundredths / 100;
                let frac = hundredths % 100;
                return match frac {
                    0 => write!(f, "{whole} {unit}"),
                    f2 if f2 % 10 == 0 => write!(f, "{whole}.{} {unit}", f2 / 10),
                    f2 => write!(f, "{whole}.{f2:02} {unit}"),
                };
            }
        }
        write!(f, "{} B", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_scale_by_powers_of_two() {
        assert_eq!(Size::kib(1).as_bytes(), 1024);
        assert_eq!(Size::mib(1).as_bytes(), 1024 * 1024);
        assert_eq!(Size::gib(2).as_bytes(), 2 * 1024 * 1024 * 1024);
        assert_eq!(Size::tib(1), Size::gib(1024));
    }

    #[test]
    fn constructors_saturate_instead_of_overflowing() {
        assert_eq!(Size::tib(u64::MAX).as_bytes(), u64::MAX);
    }

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Size::gib(1).saturating_sub(Size::gib(2)), Size::ZERO);
        assert_eq!(
            Size::bytes(u64::MAX).saturating_add(Size::bytes(1)),
            Size::bytes(u64::MAX)
        );
        assert_eq!(Size::gib(1).checked_sub(Size::gib(2)), None);
        assert_eq!(Size::gib(3).checked_sub(Size::gib(2)), Some(Size::gib(1)));
    }

    #[test]
    fn display_is_human() {
        assert_eq!(Size::bytes(512).to_string(), "512 B");
        assert_eq!(Size::kib(1).to_string(), "1 KiB");
        assert_eq!(Size::bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Size::gib(10).to_string(), "10 GiB");
        assert_eq!(Size::mib(1280).to_string(), "1.25 GiB");
        assert_eq!(Size::bytes(u64::MAX).to_string(), "16777216 TiB");
    }

    #[test]
    fn serializes_as_plain_bytes() {
        assert_eq!(
            serde_json::to_string(&Size::kib(2)).ok().as_deref(),
            Some("2048")
        );
    }
}
