import numpy as np
import pytest

from labram_jax.channels import (
    NUM_CHANNEL_ROWS, STANDARD_1020, TUH_CHANNELS, ResolvedChannels, channel_row,
    resolve_channels)

# input_chans the original LaBraM builds for TUAB/TUEV.
TUH_INPUT_CHANS = [0, 1, 3, 18, 22, 40, 44, 62, 66, 81, 83, 16, 24, 89, 91, 90, 92, 95, 96,
                   20, 42, 64, 113, 114]

# Channel names as MNE reads them from the files in /work/shared/eeg (hard-coded so the
# tests do not need those files).
EEGMAT_NAMES = [  # eegmat/Subject00_1.edf
    'EEG Fp1', 'EEG Fp2', 'EEG F3', 'EEG F4', 'EEG F7', 'EEG F8', 'EEG T3', 'EEG T4',
    'EEG C3', 'EEG C4', 'EEG T5', 'EEG T6', 'EEG P3', 'EEG P4', 'EEG O1', 'EEG O2',
    'EEG Fz', 'EEG Cz', 'EEG Pz', 'EEG A2-A1', 'ECG ECG']
EEGLAB_NAMES = [  # eeglab/eeglab_data.set
    'FPz', 'EOG1', 'F3', 'Fz', 'F4', 'EOG2', 'FC5', 'FC1', 'FC2', 'FC6', 'T7', 'C3', 'C4',
    'Cz', 'T8', 'CP5', 'CP1', 'CP2', 'CP6', 'P7', 'P3', 'Pz', 'P4', 'P8', 'PO7', 'PO3',
    'POz', 'PO4', 'PO8', 'O1', 'Oz', 'O2']
BRAINVISION_NAMES = [  # brainvision/testbva.vhdr
    'Fp1', 'Fp2', 'F3', 'F4', 'C3', 'C4', 'P3', 'P4', 'O1', 'O2', 'F7', 'F8', 'T7', 'T8',
    'P7', 'P8', 'Fz', 'Cz', 'Pz', 'FC1', 'FC2', 'CP1', 'CP2', 'FC5', 'FC6', 'CP5', 'CP6',
    'TP9', 'TP10', 'Eog', 'Ekg1', 'Ekg2']


def test_vocabulary():
    assert len(STANDARD_1020) == 136
    assert len(set(n.upper() for n in STANDARD_1020)) == 136
    assert NUM_CHANNEL_ROWS == 128
    for name, row in [('FP1', 1), ('T3', 89), ('T7', 38), ('A2', 96), ('T1', 113),
                      ('FTT9h', 115), ('P8-O2', 128), ('P4-O2', 136)]:
        assert STANDARD_1020[row - 1] == name


@pytest.mark.parametrize('spell', ['{}', 'EEG {}-REF'])
def test_tuh_matches_original(spell):
    res = resolve_channels([spell.format(n) for n in TUH_CHANNELS])
    np.testing.assert_array_equal(res.input_chans, TUH_INPUT_CHANS)
    assert res.input_chans.dtype == np.int32
    assert res.names == TUH_CHANNELS
    assert res.kept == tuple(range(23)) and res.dropped == ()


@pytest.mark.parametrize('name, row', [
    ('EEG FP1-REF', 1), ('Fp1', 1), ('EEG Fp1', 1), ('FP1-LE', 1), ('eeg-Fp1', 1),
    ('EEG:Fp1', 1), (' Fp1 ', 1), ('EEG T3-REF', 89), ('T7', 38), ('EEG A2-A1', 96),
    ('FPz', 2), ('FTT9h', 115), ('ftt9h', 115), ('P8-O2', 128), ('FP1-F7', 121),
    ('Fc5.', 28), ('Iz..', 87), ('C3-AVG', 40), ('Cz-M1', 42),
])
def test_channel_row(name, row):
    assert channel_row(name) == row


@pytest.mark.parametrize('name', [
    'EEG 20-REF', 'ECG ECG', 'EOG1', 'C3-P3', 'P4-O2', 'STI 014', '', 'EEG', 'REF',
    'Fp1-F3-REF'])
def test_channel_row_none(name):
    assert channel_row(name) is None


def test_eegmat():
    with pytest.raises(ValueError, match="'ECG ECG'"):
        resolve_channels(EEGMAT_NAMES)
    res = resolve_channels(EEGMAT_NAMES, drop_unknown=True)
    assert res.rows == (1, 3, 18, 22, 16, 24, 89, 91, 40, 44, 90, 92, 62, 66, 81, 83,
                        20, 42, 64, 96)
    assert res.names[-1] == 'A2' and res.names[6] == 'T3'
    assert res.kept == tuple(range(20))
    assert res.dropped == ('ECG ECG',)


def test_eeglab():
    res = resolve_channels(EEGLAB_NAMES, drop_unknown=True)
    assert res.dropped == ('EOG1', 'EOG2')
    assert len(res.rows) == 30
    assert [EEGLAB_NAMES[i] for i in res.kept] == [n for n in EEGLAB_NAMES if 'EOG' not in n]
    assert res.names[:3] == ('FPZ', 'F3', 'FZ') and res.rows[:3] == (2, 18, 20)
    assert dict(zip(res.names, res.rows))['POZ'] == 75


def test_brainvision():
    res = resolve_channels(BRAINVISION_NAMES, drop_unknown=True)
    assert res.dropped == ('Eog', 'Ekg1', 'Ekg2')
    assert res.kept == tuple(range(29))
    assert res.rows[:4] == (1, 3, 18, 22) and res.rows[-2:] == (48, 58)


def test_unknown_names_listed_on_one_line():
    with pytest.raises(ValueError) as err:
        resolve_channels(['Fp1', 'ECG ECG', 'Cz', 'EOG1'])
    msg = str(err.value)
    assert '\n' not in msg
    assert "'ECG ECG', 'EOG1'" in msg and 'drop_unknown=True' in msg


def test_duplicate_rows_named():
    with pytest.raises(ValueError, match=r"'Fp1' and 'EEG FP1-REF' \(row 1\)"):
        resolve_channels(['Fp1', 'Cz', 'EEG FP1-REF'])
    with pytest.raises(ValueError, match='same pos_embed row'):
        resolve_channels(['Cz', 'Cz'])


def test_empty_result():
    with pytest.raises(ValueError, match="no channel could be mapped.*'ECG ECG'"):
        resolve_channels(['ECG ECG', 'STI 014'], drop_unknown=True)
    with pytest.raises(ValueError, match='no channel could be mapped'):
        resolve_channels([])
    with pytest.raises(ValueError, match=r'\.\.\. \(80 more\)'):
        resolve_channels([f'X{i}' for i in range(100)], drop_unknown=True)


def test_bare_string_rejected():
    with pytest.raises(TypeError):
        resolve_channels('Fp1')


def test_resolved_is_frozen():
    res = resolve_channels(['Cz'])
    assert isinstance(res, ResolvedChannels)
    with pytest.raises(AttributeError):
        res.rows = (1,)
