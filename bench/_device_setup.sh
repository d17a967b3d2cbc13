# Sourced by the GPU session scripts (bench/gpu_session.sh, bench/gpu_recipes.sh) on the device:
# install the carried wheels and ctscan itself, and unpack the carried 224 px and 64 px stores.
# Needs DEVICE; exits the calling script when the install fails.
if [ -d .device/wheels ] && [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl \
    && python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
if [ -f .device/store224.txz ] && [ ! -f outputs/processed/meta.json ]; then
  mkdir -p outputs && tar xJf .device/store224.txz -C outputs
fi
if [ -f .device/store64.txz ] && [ ! -f outputs/processed64/meta.json ]; then
  mkdir -p outputs && tar xJf .device/store64.txz -C outputs
fi
