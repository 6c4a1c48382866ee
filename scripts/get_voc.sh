#!/usr/bin/env bash
# Download and unpack Pascal VOC into the layout spp-det reads (data.root=DEST/VOCdevkit).
#
#   scripts/get_voc.sh [DEST]        # DEST defaults to data/; needs ~3.6 GB free (2007: 0.9 GB, 2012: 2 GB)
#   VOC_YEARS="2007" scripts/get_voc.sh   # only VOC 2007 trainval + test
#
# Result:  DEST/VOCdevkit/VOC2007/{JPEGImages,Annotations,ImageSets}   (trainval 5,011 + test 4,952 images)
#          DEST/VOCdevkit/VOC2012/{...}                                (trainval 11,540 images)
# The archives are checked against the MD5 sums below (the same ones torchvision uses) before unpacking.
# It cannot run on a machine without internet access; copy the archives there and rerun: downloads are skipped
# when an archive with the right checksum is already in DEST.
set -euo pipefail
DEST=${1:-data}
YEARS=${VOC_YEARS:-"2007 2012"}
BASE=http://host.robots.ox.ac.uk/pascal/VOC
mkdir -p "$DEST"

fetch() {  # fetch URL MD5
  local url=$1 md5=$2 file="$DEST/$(basename "$1")"
  if [ -f "$file" ] && echo "$md5  $file" | md5sum -c --status; then
    echo "ok (cached): $file"
  else
    echo "downloading $url"
    curl -fL --retry 3 -o "$file.part" "$url" && mv "$file.part" "$file"
    echo "$md5  $file" | md5sum -c || { echo "checksum mismatch for $file; delete it and retry" >&2; exit 1; }
  fi
  tar -xf "$file" -C "$DEST"   # every archive unpacks into VOCdevkit/VOC<year>/
}

for year in $YEARS; do
  case $year in
    2007)
      fetch "$BASE/voc2007/VOCtrainval_06-Nov-2007.tar" c52e279531787c972589f7e41ab4ae64
      fetch "$BASE/voc2007/VOCtest_06-Nov-2007.tar"     b6e924de25625d8de591ea690078ad9f ;;
    2012)
      fetch "$BASE/voc2012/VOCtrainval_11-May-2012.tar" 6cd6e144f989b92b3379bac3b3de84fd ;;
    *) echo "unknown VOC year $year (2007 or 2012)" >&2; exit 2 ;;
  esac
done
echo "done: spp-det ... data.root=$DEST/VOCdevkit data.year=2007"
