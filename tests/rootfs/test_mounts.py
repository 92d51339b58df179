from shim.rootfs.mounts import MS_BIND, MS_NODEV, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, plan
from shim.rootfs.unmount import mount_points_under


def test_flags_and_data_are_split_like_containerd():
    p = plan(["ro", "nosuid", "nodev", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w"])
    assert p.flags == MS_RDONLY | MS_NOSUID | MS_NODEV
    assert p.data == "lowerdir=/a:/b,upperdir=/u,workdir=/w"


def test_clearing_options_and_propagation():
    p = plan(["ro", "rw", "rbind", "rprivate"])
    assert p.flags == MS_BIND | MS_REC
    assert p.propagation == MS_PRIVATE | MS_REC
    assert p.data == ""


def test_mount_points_under_path_deepest_first():
    info = "\n".join([
        "22 1 0:1 / / rw - ext4 /dev/vda rw",
        "30 22 0:2 / /run/b/rootfs rw - overlay overlay rw",
        "31 30 0:3 / /run/b/rootfs/proc rw - proc proc rw",
        "32 22 0:4 / /run/b/rootfs2 rw - tmpfs tmpfs rw",
        "33 30 0:5 / /run/b/rootfs/with\\040space rw - tmpfs tmpfs rw",
    ])
    assert mount_points_under("/run/b/rootfs", info) == [
        "/run/b/rootfs/proc", "/run/b/rootfs/with space", "/run/b/rootfs"]
