//! A small typed layer over the VFIO ioctls a vfio-ccw mdev needs.
//!
//! vfio-ioctls refuses CCW devices, so the dozen calls are wrapped here with nix's
//! `ioctl_*_bad!` macros (every VFIO ioctl is `_IO(';', 100 + n)`: no size in the request;
//! the size travels in each struct's `argsz`). The structures are encoded as byte images in
//! host order (they are plain `__u32`/`__u64` kernel structs), checked against vfio-bindings'
//! layouts in the tests, and never transmuted.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_REGION_INFO_CAP_TYPE,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_TYPE,
};

/// `VFIO_GET_API_VERSION` .. `VFIO_IOMMU_UNMAP_DMA`: `_IO(VFIO_TYPE, VFIO_BASE + n)`.
pub mod nr {
    /// `VFIO_GET_API_VERSION`.
    pub const GET_API_VERSION: u32 = 0;
    /// `VFIO_CHECK_EXTENSION`.
    pub const CHECK_EXTENSION: u32 = 1;
    /// `VFIO_SET_IOMMU`.
    pub const SET_IOMMU: u32 = 2;
    /// `VFIO_GROUP_GET_STATUS`.
    pub const GROUP_GET_STATUS: u32 = 3;
    /// `VFIO_GROUP_SET_CONTAINER`.
    pub const GROUP_SET_CONTAINER: u32 = 4;
    /// `VFIO_GROUP_GET_DEVICE_FD`.
    pub const GROUP_GET_DEVICE_FD: u32 = 6;
    /// `VFIO_DEVICE_GET_INFO`.
    pub const DEVICE_GET_INFO: u32 = 7;
    /// `VFIO_DEVICE_GET_REGION_INFO`.
    pub const DEVICE_GET_REGION_INFO: u32 = 8;
    /// `VFIO_DEVICE_SET_IRQS`.
    pub const DEVICE_SET_IRQS: u32 = 10;
    /// `VFIO_DEVICE_RESET`.
    pub const DEVICE_RESET: u32 = 11;
    /// `VFIO_IOMMU_MAP_DMA`.
    pub const IOMMU_MAP_DMA: u32 = 13;
    /// `VFIO_IOMMU_UNMAP_DMA`.
    pub const IOMMU_UNMAP_DMA: u32 = 14;
}

/// The ioctl request number of VFIO call `n` (`_IO(';', 100 + n)`).
pub const fn request(n: u32) -> u32 {
    ((VFIO_TYPE as u32) << 8) | (VFIO_BASE + n)
}

mod raw {
    use super::{nr, request};
    nix::ioctl_none_bad!(get_api_version, request(nr::GET_API_VERSION));
    nix::ioctl_write_int_bad!(check_extension, request(nr::CHECK_EXTENSION));
    nix::ioctl_write_int_bad!(set_iommu, request(nr::SET_IOMMU));
    nix::ioctl_readwrite_bad!(group_get_status, request(nr::GROUP_GET_STATUS), u8);
    nix::ioctl_write_ptr_bad!(
        group_set_container,
        request(nr::GROUP_SET_CONTAINER),
        libc::c_int
    );
    nix::ioctl_write_ptr_bad!(
        group_get_device_fd,
        request(nr::GROUP_GET_DEVICE_FD),
        libc::c_char
    );
    nix::ioctl_readwrite_bad!(device_get_info, request(nr::DEVICE_GET_INFO), u8);
    nix::ioctl_readwrite_bad!(
        device_get_region_info,
        request(nr::DEVICE_GET_REGION_INFO),
        u8
    );
    nix::ioctl_write_ptr_bad!(device_set_irqs, request(nr::DEVICE_SET_IRQS), u8);
    nix::ioctl_none_bad!(device_reset, request(nr::DEVICE_RESET));
    nix::ioctl_write_ptr_bad!(iommu_map_dma, request(nr::IOMMU_MAP_DMA), u8);
    nix::ioctl_readwrite_bad!(iommu_unmap_dma, request(nr::IOMMU_UNMAP_DMA), u8);
}

/// A byte image with 8-byte alignment, as the kernel structs want.
struct Aligned(Vec<u64>);

impl Aligned {
    fn from_bytes(b: &[u8]) -> Self {
        let mut v = vec![0u64; b.len().div_ceil(8)];
        for (i, c) in b.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            v[i] = u64::from_ne_bytes(w);
        }
        Aligned(v)
    }

    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr() as *mut u8
    }

    fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut out: Vec<u8> = self.0.iter().flat_map(|w| w.to_ne_bytes()).collect();
        out.truncate(len);
        out
    }
}

fn ne32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn ne16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// `sizeof(struct vfio_group_status)`.
pub const GROUP_STATUS_SIZE: usize = 8;
/// `sizeof(struct vfio_device_info)` (with `cap_offset` and `pad`).
pub const DEVICE_INFO_SIZE: usize = 24;
/// `sizeof(struct vfio_region_info)`.
pub const REGION_INFO_SIZE: usize = 32;
/// `sizeof(struct vfio_irq_set)` without its data.
pub const IRQ_SET_HEADER_SIZE: usize = 20;
/// `sizeof(struct vfio_iommu_type1_dma_map)`.
pub const DMA_MAP_SIZE: usize = 32;
/// `sizeof(struct vfio_iommu_type1_dma_unmap)` without its data.
pub const DMA_UNMAP_SIZE: usize = 24;
/// Most capability headers followed in one region-info chain (the kernel's chains are short;
/// a loop in a corrupt chain must not hang us).
pub const MAX_CAPS: usize = 16;

/// `struct vfio_device_info` as returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

/// `struct vfio_region_info` plus its `VFIO_REGION_INFO_CAP_TYPE` capability, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite).
    pub offset: u64,
    /// `(type, subtype)` from the CAP_TYPE capability.
    pub cap_type: Option<(u32, u32)>,
    /// `argsz` the kernel asked for (more than [`REGION_INFO_SIZE`] when caps did not fit).
    pub argsz: u32,
}

/// The image of a GET_REGION_INFO request of `argsz` bytes for region `index`.
pub fn region_info_request(index: u32, argsz: u32) -> Vec<u8> {
    let mut b = vec![0u8; (argsz as usize).max(REGION_INFO_SIZE)];
    b[0..4].copy_from_slice(&argsz.to_ne_bytes());
    b[8..12].copy_from_slice(&index.to_ne_bytes());
    b
}

/// Why a region-info image could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapChainError {
    /// The image is shorter than `struct vfio_region_info`.
    #[error("region info truncated")]
    Truncated,
    /// A capability offset points inside the fixed part or past the buffer.
    #[error("capability offset {0:#x} out of bounds")]
    BadOffset(u32),
    /// More than [`MAX_CAPS`] capabilities (a loop).
    #[error("capability chain too long")]
    TooLong,
}

/// Parses a GET_REGION_INFO result, following the capability chain (bounded, every offset
/// checked against the buffer) for the CAP_TYPE capability. Capabilities past the buffer
/// (the kernel set `argsz` larger than we passed) are not followed.
pub fn parse_region_info(b: &[u8]) -> Result<RegionInfo, CapChainError> {
    let t = CapChainError::Truncated;
    let argsz = ne32(b, 0).ok_or(t)?;
    let flags = ne32(b, 4).ok_or(t)?;
    let index = ne32(b, 8).ok_or(t)?;
    let mut next = ne32(b, 12).ok_or(t)?;
    let size = ne64(b, 16).ok_or(t)?;
    let offset = ne64(b, 24).ok_or(t)?;
    let mut cap_type = None;
    let fits = (argsz as usize) <= b.len();
    if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && fits {
        let mut hops = 0;
        while next != 0 {
            hops += 1;
            if hops > MAX_CAPS {
                return Err(CapChainError::TooLong);
            }
            let at = next as usize;
            if at < REGION_INFO_SIZE || at.checked_add(8).is_none_or(|e| e > b.len()) {
                return Err(CapChainError::BadOffset(next));
            }
            let id = ne16(b, at).ok_or(CapChainError::BadOffset(next))?;
            if u32::from(id) == VFIO_REGION_INFO_CAP_TYPE {
                let ty = ne32(b, at + 8).ok_or(CapChainError::BadOffset(next))?;
                let sub = ne32(b, at + 12).ok_or(CapChainError::BadOffset(next))?;
                cap_type = Some((ty, sub));
            }
            next = ne32(b, at + 4).ok_or(CapChainError::BadOffset(next))?;
        }
    }
    Ok(RegionInfo {
        index,
        flags,
        size,
        offset,
        cap_type,
        argsz,
    })
}

/// The image of a SET_IRQS request: trigger `index` with `fd`, or (None) tear it down.
pub fn irq_set_eventfd(index: u32, fd: Option<RawFd>) -> Vec<u8> {
    let (flags, count, data) = match fd {
        Some(fd) => (
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            1u32,
            Some(fd),
        ),
        // DATA_NONE with count 0 disables the trigger.
        None => (
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            None,
        ),
    };
    let argsz = IRQ_SET_HEADER_SIZE + if data.is_some() { 4 } else { 0 };
    let mut b = Vec::with_capacity(argsz);
    b.extend_from_slice(&(argsz as u32).to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // start
    b.extend_from_slice(&count.to_ne_bytes());
    if let Some(fd) = data {
        b.extend_from_slice(&fd.to_ne_bytes());
    }
    b
}

/// The image of a type1 MAP_DMA request (read + write).
pub fn dma_map(vaddr: u64, iova: u64, size: u64) -> [u8; DMA_MAP_SIZE] {
    let mut b = [0u8; DMA_MAP_SIZE];
    b[0..4].copy_from_slice(&(DMA_MAP_SIZE as u32).to_ne_bytes());
    let flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    b[4..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..16].copy_from_slice(&vaddr.to_ne_bytes());
    b[16..24].copy_from_slice(&iova.to_ne_bytes());
    b[24..32].copy_from_slice(&size.to_ne_bytes());
    b
}

/// The image of a type1 UNMAP_DMA request.
pub fn dma_unmap(iova: u64, size: u64) -> [u8; DMA_UNMAP_SIZE] {
    let mut b = [0u8; DMA_UNMAP_SIZE];
    b[0..4].copy_from_slice(&(DMA_UNMAP_SIZE as u32).to_ne_bytes());
    b[8..16].copy_from_slice(&iova.to_ne_bytes());
    b[16..24].copy_from_slice(&size.to_ne_bytes());
    b
}

fn errno<T>(r: nix::Result<T>) -> Result<T, Errno> {
    r
}

/// `VFIO_GET_API_VERSION`.
pub fn get_api_version(container: BorrowedFd<'_>) -> Result<i32, Errno> {
    // SAFETY: the request takes no argument; the fd is a borrowed open descriptor.
    errno(unsafe { raw::get_api_version(container.as_raw_fd()) })
}

/// `VFIO_CHECK_EXTENSION`: whether the container supports IOMMU model `ext` (> 0 when yes).
pub fn check_extension(container: BorrowedFd<'_>, ext: u32) -> Result<i32, Errno> {
    // SAFETY: the argument is passed by value; no memory is shared with the kernel.
    errno(unsafe { raw::check_extension(container.as_raw_fd(), ext as libc::c_int) })
}

/// `VFIO_SET_IOMMU`.
pub fn set_iommu(container: BorrowedFd<'_>, model: u32) -> Result<(), Errno> {
    // SAFETY: the argument is passed by value.
    errno(unsafe { raw::set_iommu(container.as_raw_fd(), model as libc::c_int) }).map(|_| ())
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags.
pub fn group_get_status(group: BorrowedFd<'_>) -> Result<u32, Errno> {
    let mut img = [0u8; GROUP_STATUS_SIZE];
    img[0..4].copy_from_slice(&(GROUP_STATUS_SIZE as u32).to_ne_bytes());
    let mut buf = Aligned::from_bytes(&img);
    // SAFETY: buf holds GROUP_STATUS_SIZE writable, aligned bytes, as argsz says.
    errno(unsafe { raw::group_get_status(group.as_raw_fd(), buf.ptr()) })?;
    Ok(ne32(&buf.to_bytes(GROUP_STATUS_SIZE), 4).unwrap_or(0))
}

/// `VFIO_GROUP_SET_CONTAINER`.
pub fn group_set_container(group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> Result<(), Errno> {
    let fd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one int through the pointer, which outlives the call.
    errno(unsafe { raw::group_set_container(group.as_raw_fd(), &fd) }).map(|_| ())
}

/// `VFIO_GROUP_GET_DEVICE_FD`: a new fd for device `name` (for an mdev, its UUID). The
/// caller owns the returned fd.
pub fn group_get_device_fd(group: BorrowedFd<'_>, name: &str) -> Result<RawFd, Errno> {
    let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
    // SAFETY: the kernel reads a NUL-terminated string that outlives the call.
    errno(unsafe { raw::group_get_device_fd(group.as_raw_fd(), name.as_ptr()) })
}

/// `VFIO_DEVICE_GET_INFO`.
pub fn device_get_info(dev: BorrowedFd<'_>) -> Result<DeviceInfo, Errno> {
    let mut img = [0u8; DEVICE_INFO_SIZE];
    img[0..4].copy_from_slice(&(DEVICE_INFO_SIZE as u32).to_ne_bytes());
    let mut buf = Aligned::from_bytes(&img);
    // SAFETY: buf holds DEVICE_INFO_SIZE writable, aligned bytes, as argsz says.
    errno(unsafe { raw::device_get_info(dev.as_raw_fd(), buf.ptr()) })?;
    let b = buf.to_bytes(DEVICE_INFO_SIZE);
    Ok(DeviceInfo {
        flags: ne32(&b, 4).unwrap_or(0),
        num_regions: ne32(&b, 8).unwrap_or(0),
        num_irqs: ne32(&b, 12).unwrap_or(0),
    })
}

/// `VFIO_DEVICE_GET_REGION_INFO` with its capability chain (two calls when the caps do not
/// fit the first buffer).
pub fn device_get_region_info(dev: BorrowedFd<'_>, index: u32) -> Result<RegionInfo, Errno> {
    let mut argsz = REGION_INFO_SIZE as u32;
    for _ in 0..2 {
        let img = region_info_request(index, argsz);
        let mut buf = Aligned::from_bytes(&img);
        // SAFETY: buf holds at least argsz writable, aligned bytes; the kernel writes at
        // most argsz bytes.
        errno(unsafe { raw::device_get_region_info(dev.as_raw_fd(), buf.ptr()) })?;
        let info = parse_region_info(&buf.to_bytes(img.len())).map_err(|_| Errno::EIO)?;
        // The kernel caps argsz at a few pages; refuse anything absurd.
        if info.argsz as usize > img.len() && info.argsz <= 64 * 1024 {
            argsz = info.argsz;
            continue;
        }
        return Ok(info);
    }
    Err(Errno::EIO)
}

/// `VFIO_DEVICE_SET_IRQS`: trigger IRQ `index` on `fd` (None: disable it).
pub fn device_set_irq_eventfd(
    dev: BorrowedFd<'_>,
    index: u32,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), Errno> {
    let img = irq_set_eventfd(index, fd.map(|f| f.as_raw_fd()));
    let mut buf = Aligned::from_bytes(&img);
    // SAFETY: buf holds the argsz bytes the header announces; the kernel only reads them.
    errno(unsafe { raw::device_set_irqs(dev.as_raw_fd(), buf.ptr()) }).map(|_| ())
}

/// `VFIO_DEVICE_RESET`.
pub fn device_reset(dev: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: the request takes no argument.
    errno(unsafe { raw::device_reset(dev.as_raw_fd()) }).map(|_| ())
}

/// `VFIO_IOMMU_MAP_DMA`: `iova..iova + size` translates to process address `vaddr`.
pub fn iommu_map_dma(
    container: BorrowedFd<'_>,
    vaddr: u64,
    iova: u64,
    size: u64,
) -> Result<(), Errno> {
    let mut buf = Aligned::from_bytes(&dma_map(vaddr, iova, size));
    // SAFETY: buf holds DMA_MAP_SIZE aligned bytes; the kernel only reads them. The memory
    // at vaddr is the caller's to keep mapped while the container maps it.
    errno(unsafe { raw::iommu_map_dma(container.as_raw_fd(), buf.ptr()) }).map(|_| ())
}

/// `VFIO_IOMMU_UNMAP_DMA`: the number of bytes unmapped.
pub fn iommu_unmap_dma(container: BorrowedFd<'_>, iova: u64, size: u64) -> Result<u64, Errno> {
    let mut buf = Aligned::from_bytes(&dma_unmap(iova, size));
    // SAFETY: buf holds DMA_UNMAP_SIZE writable, aligned bytes; the kernel writes back size.
    errno(unsafe { raw::iommu_unmap_dma(container.as_raw_fd(), buf.ptr()) })?;
    Ok(ne64(&buf.to_bytes(DMA_UNMAP_SIZE), 16).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use vfio_bindings::bindings::vfio as b;

    #[test]
    fn request_numbers() {
        // _IO(';', 100 + n): ';' = 0x3B in bits 8-15, no direction or size bits.
        assert_eq!(request(nr::GET_API_VERSION), 0x3B64);
        assert_eq!(request(nr::CHECK_EXTENSION), 0x3B65);
        assert_eq!(request(nr::SET_IOMMU), 0x3B66);
        assert_eq!(request(nr::GROUP_GET_STATUS), 0x3B67);
        assert_eq!(request(nr::GROUP_SET_CONTAINER), 0x3B68);
        assert_eq!(request(nr::GROUP_GET_DEVICE_FD), 0x3B6A);
        assert_eq!(request(nr::DEVICE_GET_INFO), 0x3B6B);
        assert_eq!(request(nr::DEVICE_GET_REGION_INFO), 0x3B6C);
        assert_eq!(request(nr::DEVICE_SET_IRQS), 0x3B6E);
        assert_eq!(request(nr::DEVICE_RESET), 0x3B6F);
        assert_eq!(request(nr::IOMMU_MAP_DMA), 0x3B71);
        assert_eq!(request(nr::IOMMU_UNMAP_DMA), 0x3B72);
    }

    #[test]
    fn sizes_match_vfio_bindings() {
        assert_eq!(size_of::<b::vfio_group_status>(), GROUP_STATUS_SIZE);
        assert_eq!(size_of::<b::vfio_device_info>(), DEVICE_INFO_SIZE);
        assert_eq!(size_of::<b::vfio_region_info>(), REGION_INFO_SIZE);
        assert_eq!(size_of::<b::vfio_irq_set>(), IRQ_SET_HEADER_SIZE);
        assert_eq!(size_of::<b::vfio_iommu_type1_dma_map>(), DMA_MAP_SIZE);
        assert_eq!(size_of::<b::vfio_iommu_type1_dma_unmap>(), DMA_UNMAP_SIZE);
        assert_eq!(offset_of!(b::vfio_region_info, cap_offset), 12);
        assert_eq!(offset_of!(b::vfio_region_info, offset), 24);
        assert_eq!(offset_of!(b::vfio_iommu_type1_dma_map, iova), 16);
        assert_eq!(size_of::<b::vfio_region_info_cap_type>(), 16);
        assert_eq!(offset_of!(b::vfio_info_cap_header, next), 4);
    }

    fn ne(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn irq_set_image() {
        // argsz 24, DATA_EVENTFD|ACTION_TRIGGER (0x24), index 0 (IO), start 0, count 1, fd 7.
        assert_eq!(irq_set_eventfd(0, Some(7)), ne(&[24, 0x24, 0, 0, 1, 7]));
        // Teardown: argsz 20, DATA_NONE|ACTION_TRIGGER (0x21), index 1 (CRW), count 0.
        assert_eq!(irq_set_eventfd(1, None), ne(&[20, 0x21, 1, 0, 0]));
    }

    #[test]
    fn dma_images() {
        let m = dma_map(0x3ff_8000_0000, 0x7000_0000, 0x100_0000);
        let mut want = ne(&[32, 3]);
        want.extend(0x3ff_8000_0000u64.to_ne_bytes());
        want.extend(0x7000_0000u64.to_ne_bytes());
        want.extend(0x100_0000u64.to_ne_bytes());
        assert_eq!(m.to_vec(), want);
        let u = dma_unmap(0x1000, 0x2000);
        let mut want = ne(&[24, 0]);
        want.extend(0x1000u64.to_ne_bytes());
        want.extend(0x2000u64.to_ne_bytes());
        assert_eq!(u.to_vec(), want);
    }

    #[test]
    fn region_info_request_image() {
        let r = region_info_request(3, 32);
        assert_eq!(r, ne(&[32, 0, 3, 0, 0, 0, 0, 0]));
        assert_eq!(region_info_request(1, 48).len(), 48);
    }

    /// A region-info image as vfio-ccw returns it for the SCHIB region: CAPS flag, one
    /// CAP_TYPE capability (type 2, subtype 2) at offset 32, preceded in the chain by a
    /// sparse-mmap-like capability (id 1) at 48.
    fn schib_image() -> Vec<u8> {
        let mut b = ne(&[64, 0x1 | 0x8, 2, 48]);
        b.extend(52u64.to_ne_bytes()); // size
        b.extend((2u64 << 40).to_ne_bytes()); // offset
        b.extend(&2u16.to_ne_bytes()); // @32 id CAP_TYPE
        b.extend(&1u16.to_ne_bytes()); // version
        b.extend(&0u32.to_ne_bytes()); // next: end
        b.extend(ne(&[2, 2])); // type, subtype
        b.extend(&1u16.to_ne_bytes()); // @48 id 1
        b.extend(&1u16.to_ne_bytes());
        b.extend(&32u32.to_ne_bytes()); // next -> 32
        b.extend(ne(&[0, 0]));
        b
    }

    #[test]
    fn cap_chain_found() {
        let r = parse_region_info(&schib_image()).unwrap();
        assert_eq!(r.index, 2);
        assert_eq!(r.size, 52);
        assert_eq!(r.offset, 2 << 40);
        assert_eq!(r.cap_type, Some((2, 2)));
        assert_eq!(r.argsz, 64);
    }

    #[test]
    fn cap_chain_hostile() {
        // No CAPS flag: the chain is ignored.
        let mut b = schib_image();
        b[4..8].copy_from_slice(&0x1u32.to_ne_bytes());
        assert_eq!(parse_region_info(&b).unwrap().cap_type, None);
        // argsz larger than the buffer (the kernel wants a second call): not followed.
        let mut b = schib_image();
        b[0..4].copy_from_slice(&128u32.to_ne_bytes());
        assert_eq!(parse_region_info(&b).unwrap().cap_type, None);
        // Offset into the fixed part.
        let mut b = schib_image();
        b[12..16].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(parse_region_info(&b), Err(CapChainError::BadOffset(8)));
        // Offset past the end.
        let mut b = schib_image();
        b[12..16].copy_from_slice(&60u32.to_ne_bytes());
        assert_eq!(parse_region_info(&b), Err(CapChainError::BadOffset(60)));
        // A loop: 32 -> 48 -> 32 ...
        let mut b = schib_image();
        b[36..40].copy_from_slice(&48u32.to_ne_bytes());
        assert_eq!(parse_region_info(&b), Err(CapChainError::TooLong));
        // Truncated fixed part.
        assert_eq!(parse_region_info(&[0; 31]), Err(CapChainError::Truncated));
    }
}
